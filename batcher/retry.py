"""The retry policy: tenacity, exponential backoff with full jitter, Retry-After respected."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from batcher.config import RetryConfig
from batcher.errors import AttemptError

Sleep = Callable[[float], Awaitable[None]]


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


def row_retrying(
    config: RetryConfig,
    *,
    deadline: float | None,
    clock: Callable[[], float],
    sleep: Sleep = anyio.sleep,
) -> AsyncRetrying:
    """A fresh policy for one request of a row: its failures counted by kind, and the row's
    ``deadline`` (from ``retry.deadline_s``) on ``clock``."""
    return AsyncRetrying(
        sleep=sleep,
        stop=stop_after_failures(config.max_attempts, config.invalid_output_attempts)
        | stop_at_deadline(deadline, clock),
        wait=_wait(config),
        retry=retry_if_exception(is_retryable),
        reraise=True,
    )
