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


def retrying(
    config: RetryConfig,
    *,
    sleep: Sleep = anyio.sleep,
    stop: Callable[[RetryCallState], bool] | None = None,
) -> AsyncRetrying:
    """A fresh policy for one request (tenacity keeps per-request statistics on it).

    ``stop`` replaces the default (``max_attempts``, then ``deadline_s``) when a caller counts
    attempts of several kinds.
    """
    if stop is None:
        default: stop_base = stop_after_attempt(config.max_attempts)
        if config.deadline_s is not None:
            default = default | stop_before_delay(config.deadline_s)
        stop = default
    return AsyncRetrying(
        sleep=sleep,
        stop=stop,
        wait=wait_retry_after(
            wait_random_exponential(multiplier=config.initial_backoff_s, max=config.max_backoff_s)
        ),
        retry=retry_if_exception(is_retryable),
        reraise=True,
    )
