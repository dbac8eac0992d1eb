"""The retry policy: tenacity, exponential backoff with full jitter, Retry-After respected."""

from __future__ import annotations

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
    """The backoff, but never shorter than the server's Retry-After."""

    def __init__(self, backoff: wait_base) -> None:
        self.backoff = backoff

    def __call__(self, retry_state: RetryCallState) -> float:
        delay = self.backoff(retry_state)
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, AttemptError) and exc.retry_after_s is not None:
            return max(delay, exc.retry_after_s)
        return delay


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
