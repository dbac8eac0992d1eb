"""The limiter's maths on an injected clock: spacing, budgets, pauses, adaptation."""

from __future__ import annotations

import itertools

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batcher.client import parse_retry_after
from batcher.limiter import RateLimiter


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)
        await anyio.lowlevel.checkpoint()


def limiter(time: FakeTime, **kwargs: object) -> RateLimiter:
    return RateLimiter(clock=time.clock, sleep=time.sleep, **kwargs)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_requests_are_spread_evenly_without_an_initial_burst() -> None:
    time = FakeTime()
    pacer = limiter(time, requests_per_minute=600)
    starts = []
    for _ in range(50):
        await pacer.acquire()
        starts.append(time.now)
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(starts)}
    assert gaps == {0.1}


@pytest.mark.anyio
async def test_tokens_budget_and_correction() -> None:
    time = FakeTime()
    pacer = limiter(time, tokens_per_minute=6000)  # 100 tokens/s
    await pacer.acquire(100)
    await pacer.acquire(100)
    assert time.now == pytest.approx(1.0)
    pacer.settle(estimated_tokens=100, actual_tokens=300)  # the server counted more
    await pacer.acquire(100)
    assert time.now == pytest.approx(4.0)


@pytest.mark.anyio
async def test_pause_holds_every_worker() -> None:
    time = FakeTime()
    pacer = limiter(time, requests_per_minute=6000)
    await pacer.acquire()
    pacer.pause(5.0)
    await pacer.acquire()
    assert time.now >= 5.0


@given(
    rpm=st.floats(min_value=10, max_value=100_000),
    tpm=st.floats(min_value=1_000, max_value=10_000_000),
    costs=st.lists(st.integers(min_value=1, max_value=5_000), min_size=2, max_size=150),
)
@settings(max_examples=60, deadline=None)
def test_budget_is_never_exceeded_in_any_window(rpm: float, tpm: float, costs: list[int]) -> None:
    time = FakeTime()
    pacer = limiter(time, requests_per_minute=rpm, tokens_per_minute=tpm)
    starts: list[float] = []

    async def drive() -> None:
        for cost in costs:
            await pacer.acquire(cost)
            starts.append(time.now)

    anyio.run(drive)
    window = 60.0
    for i, begin in enumerate(starts):
        inside = [j for j in range(i, len(starts)) if starts[j] < begin + window]
        assert len(inside) <= rpm + 1
        # Tokens charged inside a minute: at most the budget plus the request that opened it.
        assert sum(costs[j] for j in inside) <= tpm + max(costs) + 1e-6


def test_adaptive_cut_needs_real_congestion_and_recovers() -> None:
    time = FakeTime()
    pacer = limiter(time, requests_per_minute=3600)  # 60/s configured
    for _ in range(100):  # a few 429s among many answers: incidental
        time.now += 0.05
        pacer.on_success(10)
    pacer.on_rate_limited()
    pacer.on_rate_limited()
    assert pacer.scale == 1.0
    for _ in range(20):  # the server serves 20/s and refuses the rest
        time.now += 0.05
        pacer.on_success(10)
        pacer.on_rate_limited()
        pacer.on_rate_limited()
    assert pacer.requests_per_s is not None
    assert pacer.requests_per_s < 42  # cut at least to DECREASE of 60/s
    cut = pacer.requests_per_s
    for _ in range(200):  # quiet time raises it again
        time.now += 0.1
        pacer.on_success(10)
    assert pacer.requests_per_s > cut


def test_not_adaptive_never_changes_rate() -> None:
    time = FakeTime()
    pacer = limiter(time, requests_per_minute=600, adaptive=False)
    for _ in range(50):
        pacer.on_rate_limited()
    assert pacer.requests_per_s == 10


def test_retry_after_forms() -> None:
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert parse_retry_after(httpx.Headers({"Retry-After": "3"})) == 3.0
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert parse_retry_after(httpx.Headers({"Retry-After": date}), now=1445412470.0) == 10.0
    assert parse_retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert parse_retry_after(httpx.Headers({})) is None
