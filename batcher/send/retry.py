"""The retry policy: tenacity, exponential backoff with full jitter, Retry-After respected."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from tenacity import (
    AsyncRetrying,
    DoAttempt,
    DoSleep,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from batcher.config import RetryConfig
from batcher.send.attempt import AttemptError

Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, AttemptError) and exc.retryable


class wait_retry_after(wait_base):  # noqa: N801 - named like tenacity's own wait strategies
    """The backoff, but never shorter than the server's Retry-After.

    A 429 that says when to come back is retried then (plus up to a tenth more, so the
    requests it refused do not return in one burst): its wait is the server's, not a backoff
    grown by earlier attempts. Pacing then queues the retry like any request.
    """

    def __init__(self, backoff: wait_base, jitter: Callable[[], float] = random.random) -> None:
        self.backoff = backoff
        self.jitter = jitter

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, AttemptError) and exc.retry_after_s is not None:
            if exc.status == 429:
                return exc.retry_after_s * (1 + 0.1 * self.jitter())
            return max(self.backoff(retry_state), exc.retry_after_s)
        return self.backoff(retry_state)


class stop_after_failures(stop_base):  # noqa: N801 - named like tenacity's own stops
    """Stop once ``max_attempts`` attempts failed, or more than ``invalid_output_attempts``
    replies did not parse.

    A 429 counts as neither: "slow down" is not a failure of the row, so rate-limited attempts
    end only at the deadline (or when the run stalls). Tenacity asks a stop once per failed
    attempt it would retry, so each instance counts the failures of one request.
    """

    def __init__(self, max_attempts: int, invalid_output_attempts: int) -> None:
        self.max_attempts = max_attempts
        self.invalid_output_attempts = invalid_output_attempts
        self.failed = 0
        self.invalid = 0

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, AttemptError) and exc.kind == "invalid_output":
            self.invalid += 1
        elif not (isinstance(exc, AttemptError) and exc.status == 429):
            self.failed += 1
        return self.failed >= self.max_attempts or self.invalid > self.invalid_output_attempts


class stop_at_deadline(stop_base):  # noqa: N801 - named like tenacity's own stops
    """Stop once ``clock()`` reaches ``deadline`` (never without one)."""

    def __init__(self, deadline: float | None, clock: Callable[[], float]) -> None:
        self.deadline = deadline
        self.clock = clock

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline


def _wait(config: RetryConfig) -> wait_base:
    return wait_retry_after(
        wait_random_exponential(multiplier=config.initial_backoff_s, max=config.max_backoff_s)
    )


def retrying(config: RetryConfig, *, sleep: Sleep = anyio.sleep) -> AsyncRetrying:
    """A fresh policy for one call of the Batch API: ``max_attempts``, then ``deadline_s``."""
    stop: stop_base = stop_after_attempt(config.max_attempts)
    if config.deadline_s is not None:
        stop = stop | stop_before_delay(config.deadline_s)
    return AsyncRetrying(
        sleep=sleep,
        stop=stop,
        wait=_wait(config),
        retry=retry_if_exception(is_retryable),
        reraise=True,
    )


class Exhausted(Exception):  # noqa: N818 - the policy's verdict, not a new error kind
    """A request ended without an answer: ``error`` is its last attempt's, of ``attempts``."""

    def __init__(self, error: AttemptError, attempts: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts


class RowPolicy:
    """The retry policy of a run's requests: when to try again, how long to wait first.

    The wait and the retry test are stateless and shared by every request; the stop, which
    counts one request's failures, is made anew for each request that fails once.
    """

    def __init__(
        self,
        config: RetryConfig,
        *,
        clock: Callable[[], float],
        sleep: Sleep = anyio.sleep,
        on_retry: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.sleep = sleep
        self._wait = _wait(config)
        self._retry = retry_if_exception(is_retryable)
        self._on_retry = on_retry

    def retrying(self, deadline: float | None) -> AsyncRetrying:
        """One request's tenacity loop: its failures counted by kind, and the row's
        ``deadline`` (from ``retry.deadline_s``) on the policy's clock."""
        config = self.config
        stop: stop_base = stop_after_failures(config.max_attempts, config.invalid_output_attempts)
        if deadline is not None:
            stop = stop | stop_at_deadline(deadline, self.clock)
        return AsyncRetrying(
            sleep=self.sleep,
            stop=stop,
            wait=self._wait,
            retry=self._retry,
            before=self._before,
            reraise=True,
        )

    def _before(self, retry_state: RetryCallState) -> None:
        if retry_state.attempt_number > 1:
            self._on_retry()

    async def run(
        self, attempt: Callable[[], Awaitable[T]], deadline: float | None
    ) -> tuple[T, int]:
        """What ``attempt`` returned and the attempts it took; raises Exhausted.

        Nearly every request is answered at once, and building tenacity's loop costs about
        30 µs a request (6 % of a row's CPU at 0 ms latency, measured): the first attempt
        runs before the loop is built. A first attempt that fails becomes the loop's attempt
        1 (its outcome recorded with ``RetryCallState.set_exception``, not raised again), so
        the waits and the stop count it like any other.
        """
        try:
            return await attempt(), 1
        except AttemptError as exc:
            if not exc.retryable:
                raise Exhausted(exc, 1) from None
            first = exc
        retrying = self.retrying(deadline)
        retrying.begin()
        state = RetryCallState(retrying, fn=None, args=(), kwargs={})
        state.set_exception((type(first), first, first.__traceback__))
        try:
            while True:  # tenacity's own driving loop, from an outcome already known
                action = await retrying.iter(state)
                if isinstance(action, DoAttempt):
                    try:
                        state.set_result(await attempt())
                    except AttemptError as exc:
                        state.set_exception((type(exc), exc, exc.__traceback__))
                elif isinstance(action, DoSleep):
                    state.prepare_for_next_attempt()
                    await self.sleep(action)
                else:
                    return action, state.attempt_number
        except AttemptError as exc:
            raise Exhausted(exc, state.attempt_number) from None
