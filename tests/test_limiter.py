"""The pacer's maths on an injected clock: spacing, budgets, settling, pauses, cuts."""

from __future__ import annotations

import itertools

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batcher.flow.limiter import Cost, RateLimiter
from batcher.flow.server_limits import parse_retry_after
from tests.fakes import FakeTime

__all__ = ["FakeTime"]  # test_flow.py takes the fake clock from here


def pacer(time: FakeTime, **rates: float) -> RateLimiter:
    limiter = RateLimiter(clock=time.clock, sleep=time.sleep)
    for budget, per_s in rates.items():
        limiter.set_rate(budget, per_s)
    return limiter


@pytest.mark.anyio
async def test_requests_are_spread_evenly_without_an_initial_burst() -> None:
    time = FakeTime()
    limiter = pacer(time, requests=10)
    starts = []
    for _ in range(50):
        await limiter.acquire()
        starts.append(time.now)
    assert {round(b - a, 9) for a, b in itertools.pairwise(starts)} == {0.1}


@pytest.mark.anyio
async def test_unpaced_budgets_never_wait() -> None:
    time = FakeTime()
    limiter = pacer(time)
    for _ in range(100):
        await limiter.acquire(Cost(1000, 1000))
    assert time.now == 0.0
    assert limiter.waits == 0


@pytest.mark.anyio
async def test_token_budgets_count_their_own_part_and_settle() -> None:
    time = FakeTime()
    limiter = pacer(time, input_tokens=100, output_tokens=10)  # per second
    await limiter.acquire(Cost(100, 10))
    await limiter.acquire(Cost(100, 10))
    assert time.now == pytest.approx(1.0)  # both budgets allow one such request a second
    limiter.settle(Cost(100, 10), Cost(100, 40))  # the server counted more output
    await limiter.acquire(Cost(100, 10))
    assert time.now == pytest.approx(5.0)  # 30 more output tokens at 10/s pushed it 3 s out


@pytest.mark.anyio
async def test_pause_holds_every_request_until_the_server_says() -> None:
    time = FakeTime()
    limiter = pacer(time, requests=100)
    await limiter.acquire()
    limiter.pause_until(5.0)
    await limiter.acquire()
    assert time.now >= 5.0


@pytest.mark.anyio
async def test_a_cut_gives_up_slots_reserved_at_the_old_rate() -> None:
    time = FakeTime()
    limiter = pacer(time, requests=1)
    await limiter.acquire()  # went at 0; the next would be at 1 s
    limiter.set_rate("requests", 0.5)
    await limiter.acquire()
    await limiter.acquire()
    # The new spacing counts from the request that went: 2 s after it, then 2 s apart (not
    # the old 1 s, and not at once: one sent at the cut would meet the congestion it answers).
    assert time.now == pytest.approx(4.0)


@pytest.mark.anyio
async def test_a_slot_given_up_at_a_cut_is_not_counted_as_gone() -> None:
    time = FakeTime()
    limiter: RateLimiter

    async def sleep(seconds: float) -> None:
        # The cut comes half a second into the wait for the slot at 1 s, which is given up.
        time.now += 0.5
        if limiter.rates["requests"] == 1:
            limiter.set_rate("requests", 0.5)
        await time.sleep(max(seconds - 0.5, 0.0))

    limiter = RateLimiter(clock=time.clock, sleep=sleep)
    limiter.set_rate("requests", 1)
    await limiter.acquire()  # went at 0
    await limiter.acquire()
    # 2 s after the request that went at 0; counting from the slot given up (1 s) gives 3.
    assert time.now == pytest.approx(2.0)


@given(
    rpm=st.floats(min_value=10, max_value=100_000),
    tpm=st.floats(min_value=1_000, max_value=10_000_000),
    costs=st.lists(st.integers(min_value=1, max_value=5_000), min_size=2, max_size=150),
)
@settings(max_examples=60, deadline=None)
def test_budget_is_never_exceeded_in_any_window(rpm: float, tpm: float, costs: list[int]) -> None:
    time = FakeTime()
    limiter = pacer(time, requests=rpm / 60, tokens=tpm / 60)
    starts: list[float] = []

    async def drive() -> None:
        for cost in costs:
            await limiter.acquire(Cost(cost, 0))
            starts.append(time.now)

    anyio.run(drive)
    for i, begin in enumerate(starts):
        inside = [j for j in range(i, len(starts)) if starts[j] < begin + 60.0]
        assert len(inside) <= rpm + 1
        # Tokens charged inside a minute: at most the budget plus the request that opened it.
        assert sum(costs[j] for j in inside) <= tpm + max(costs) + 1e-6


def test_retry_after_forms() -> None:
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert parse_retry_after(httpx.Headers({"Retry-After": "3"})) == 3.0
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert parse_retry_after(httpx.Headers({"Retry-After": date}), now=1445412470.0) == 10.0
    assert parse_retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert parse_retry_after(httpx.Headers({})) is None
