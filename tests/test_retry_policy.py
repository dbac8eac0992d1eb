"""The retry policy and the budget, unit by unit: nothing waits, every wait is recorded."""

from __future__ import annotations

import pytest
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_fixed

from batcher.config import RetryConfig
from batcher.rows.request import RowRequest
from batcher.send.attempt import AttemptError
from batcher.send.budget import Budget, BudgetStop
from batcher.send.prices import Price, PriceTable
from batcher.send.retry import Exhausted, RowPolicy, is_retryable, wait_retry_after
from batcher.send.tally import Tally
from tests.fakes import FakeTime

pytestmark = pytest.mark.anyio


def http(status: int, retry_after_s: float | None = None) -> AttemptError:
    return AttemptError(
        f"http_{status}", "refused", retryable=True, status=status, retry_after_s=retry_after_s
    )


INVALID = AttemptError("invalid_output", "not JSON", retryable=True)


async def tries(policy: AsyncRetrying, errors: list[AttemptError]) -> int:
    """Attempts ``policy`` makes before it gives up, the n-th raising ``errors[n]`` (the last
    one again once they run out)."""
    tried = 0
    try:
        async for attempt in policy:
            with attempt:
                tried += 1
                raise errors[min(tried, len(errors)) - 1]
    except AttemptError:
        return tried
    raise AssertionError("unreachable: every attempt raises")  # pragma: no cover


async def attempts_until_stop(errors: list[AttemptError], config: RetryConfig) -> int:
    time = FakeTime()
    policy = RowPolicy(config, clock=time.clock, sleep=time.retry_sleep).retrying(None)
    return await tries(policy, errors)


async def test_max_attempts_counts_transport_failures() -> None:
    assert await attempts_until_stop([http(500)], RetryConfig(max_attempts=3)) == 3


async def test_429s_are_not_counted_against_max_attempts() -> None:
    errors = [http(429, 0.1)] * 5 + [http(500)]
    assert await attempts_until_stop(errors, RetryConfig(max_attempts=2)) == 7


async def test_invalid_output_is_counted_on_its_own() -> None:
    config = RetryConfig(max_attempts=2, invalid_output_attempts=3)
    # One transport failure, then invalid replies: four of them are allowed to be tried.
    assert await attempts_until_stop([http(502), *[INVALID] * 9], config) == 5


async def test_deadline_stops_on_the_injected_clock() -> None:
    time = FakeTime()
    config = RetryConfig(max_attempts=100, initial_backoff_s=2, max_backoff_s=2)
    rows = RowPolicy(config, clock=time.clock, sleep=time.retry_sleep)
    policy = rows.retrying(deadline=time.now + 5)
    tried = await tries(policy, [http(503)])
    assert time.now >= 5
    assert tried == len(time.retry_waits) + 1


async def test_run_answers_at_once_without_a_wait() -> None:
    time, retries = FakeTime(), list[float]()
    policy = RowPolicy(
        RetryConfig(), clock=time.clock, sleep=time.retry_sleep, on_retry=lambda: retries.append(1)
    )

    async def answer() -> str:
        return "ok"

    assert await policy.run(answer, None) == ("ok", 1)
    assert (time.retry_waits, retries) == ([], [])


async def test_run_counts_a_failed_first_attempt_like_any_other() -> None:
    time, retries = FakeTime(), list[float]()
    policy = RowPolicy(
        RetryConfig(max_attempts=2),
        clock=time.clock,
        sleep=time.retry_sleep,
        on_retry=lambda: retries.append(time.now),
    )
    errors = iter([http(503), http(503), http(503)])

    async def fail() -> str:
        raise next(errors)

    with pytest.raises(Exhausted) as exhausted:
        await policy.run(fail, None)
    # max_attempts=2: the first attempt (made before tenacity's loop) counts as one.
    assert exhausted.value.attempts == 2
    assert exhausted.value.error.kind == "http_503"
    assert len(time.retry_waits) == 1
    assert len(retries) == 1


async def test_run_gives_up_at_once_on_what_is_not_retried() -> None:
    time = FakeTime()
    policy = RowPolicy(RetryConfig(), clock=time.clock, sleep=time.retry_sleep)

    async def refused() -> str:
        raise AttemptError("http_400", "bad request", retryable=False, status=400)

    with pytest.raises(Exhausted) as exhausted:
        await policy.run(refused, None)
    assert exhausted.value.attempts == 1
    assert time.retry_waits == []


@pytest.mark.parametrize(("jitter", "expected"), [(0.0, 3.0), (0.5, 3.15), (1.0, 3.3)])
async def test_a_429_waits_its_retry_after_plus_at_most_a_tenth(
    jitter: float, expected: float
) -> None:
    time = FakeTime()
    policy = AsyncRetrying(
        sleep=time.retry_sleep,
        stop=stop_after_attempt(2),
        wait=wait_retry_after(wait_fixed(100), jitter=lambda: jitter),
        retry=retry_if_exception(is_retryable),
        reraise=True,
    )
    assert await tries(policy, [http(429, 3.0)]) == 2
    assert time.retry_waits == [pytest.approx(expected)]


async def test_other_retry_after_is_a_floor_under_the_backoff() -> None:
    time = FakeTime()
    policy = AsyncRetrying(
        sleep=time.retry_sleep,
        stop=stop_after_attempt(3),
        wait=wait_retry_after(wait_fixed(2)),
        retry=retry_if_exception(is_retryable),
        reraise=True,
    )
    assert await tries(policy, [http(503, 5.0), http(503, 1.0), http(503)]) == 3
    assert time.retry_waits == [5.0, 2.0]


def budget(tally: Tally, cap: float | None) -> Budget:
    prices = PriceTable({"m": Price(input=125_000, output=125_000)})  # $0.125 a token
    return Budget(cap, prices, tally)


def request(estimated_tokens: int) -> RowRequest:
    """Its worst case: 61 prompt tokens (its body's 29 bytes and a request's 32) and 43
    completion (its max_tokens), $13."""
    return RowRequest("k", {"model": "m", "max_tokens": 43}, b"f", estimated_tokens)


def hold_and_fail(spend: Budget, tally: Tally) -> None:
    with spend.reserve(request(10)):
        assert tally.inflight_cost_usd == 26.0
        raise RuntimeError


def test_budget_holds_the_upper_bound_while_in_flight_and_releases_it() -> None:
    tally = Tally()
    spend = budget(tally, cap=100.0)
    with spend.reserve(request(10)):
        assert tally.inflight_cost_usd == 13.0
        with pytest.raises(RuntimeError):
            hold_and_fail(spend, tally)
        assert tally.inflight_cost_usd == 13.0
    assert tally.inflight_cost_usd == 0.0
    spend.settle(7.0)
    spend.settle(None)
    assert tally.cost_usd == 7.0


def test_budget_refuses_what_could_cross_the_cap() -> None:
    tally = Tally(cost_usd=80.0)
    spend = budget(tally, cap=100.0)
    with spend.reserve(request(10)), pytest.raises(BudgetStop):  # 80 + 13 + 13 > 100
        spend.reserve(request(10)).__enter__()
    assert tally.inflight_cost_usd == 0.0


def test_no_cap_holds_nothing() -> None:
    tally = Tally(cost_usd=1e9)
    with budget(tally, cap=None).reserve(request(10)):
        assert tally.inflight_cost_usd == 0.0
