"""Pacing: requests/minute and tokens/minute for every worker of a run, spread evenly.

The limiter is a GCRA-style scheduler: each request reserves the next free slot on a virtual
clock (one slot per request, and its estimated tokens on a second clock) and sleeps until it.
Nothing accumulates while idle, so there is never a burst of a minute's budget. All state
changes happen between awaits, so on one event loop no lock is needed.

Adaptive mode is AIMD on the configured rates: congestion (429s that are a real share of the
answers) cuts them to just under what the server was seen to serve (by ``DECREASE`` while that
is not measurable yet), and time without congestion raises them back by a small step each
second, up to the configured ceiling. With no rate configured there is nothing to adapt:
concurrency bounds the load, and each 429's Retry-After pauses every worker.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable

import anyio

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

DECREASE = 0.7  # multiplicative decrease when the served rate is not yet measurable
SERVED_SHARE = 0.95  # a cut aims just under the rate the server was seen to serve
FLOOR = 0.25  # never cut below this share of the current rate in one step
INCREASE_PER_S = 0.003  # additive increase, as a share of the rate set at the last cut
CONGESTED_SHARE = 0.02  # 429s above this share of recent answers mean the rate is too high
_WINDOW_S = 10.0
_MIN_SAMPLES = 10  # fewer answers than this since the last cut say nothing about a rate


class RateLimiter:
    """Shared by all workers of a run; ``acquire`` before each request."""

    def __init__(
        self,
        *,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        adaptive: bool = True,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self.adaptive = adaptive
        self.ceiling_rps = requests_per_minute / 60 if requests_per_minute else None
        self.tokens_per_s = tokens_per_minute / 60 if tokens_per_minute else None
        # `scale` multiplies both configured rates; adaptive mode moves it in (0, 1].
        self.scale = 1.0
        self._next_request = 0.0
        self._next_token = 0.0
        self._paused_until = 0.0
        self._last_raise = 0.0
        self._cut_scale = 0.0
        self._served: deque[tuple[float, int]] = deque()
        self._served_tokens = 0
        self._last_cut = -1.0
        self._limited = 0  # 429s to requests sent since the last cut
        self._answers = 0  # all answers to requests sent since the last cut
        self._served_since_cut = (0, 0)  # replies and their tokens since the last cut

    @property
    def requests_per_s(self) -> float | None:
        """The request rate in force now (None: unpaced)."""
        return self.ceiling_rps * self.scale if self.ceiling_rps is not None else None

    async def acquire(self, tokens: int = 0) -> float:
        """Wait for this request's slot; ``tokens`` is its estimated token cost.

        Returns when the slot was reserved, to hand back with the answer: a request reserved
        before a cut was paced at the old rate, so its 429 says nothing about the new one.
        """
        while True:
            now = self._clock()
            if now < self._paused_until:
                await self._sleep(self._paused_until - now)
                continue
            reserved_at = now
            start = max(now, self._next_request, self._next_token)
            rate = self.requests_per_s
            if rate is not None:
                self._next_request = start + 1 / rate
            if self.tokens_per_s is not None:
                self._next_token = start + tokens / (self.tokens_per_s * self.scale)
            if start > now:
                await self._sleep(start - now)
            if self._clock() >= self._paused_until and reserved_at >= self._last_cut:
                return reserved_at
            # A 429 paused everyone, or the rate was cut, while this request slept on a slot of
            # the old schedule: queue again.

    def settle(self, estimated_tokens: int, actual_tokens: int) -> None:
        """Correct the token clock with the server's usage once the reply is in."""
        if self.tokens_per_s is not None:
            self._next_token += (actual_tokens - estimated_tokens) / (
                self.tokens_per_s * self.scale
            )

    def pause(self, seconds: float) -> None:
        """Stop every worker for ``seconds`` (a server's Retry-After)."""
        until = self._clock() + seconds
        self._paused_until = max(self._paused_until, until)
        self._next_request = max(self._next_request, until)
        self._next_token = max(self._next_token, until)

    def on_success(self, tokens: int = 0, sent_at: float | None = None) -> None:
        """A reply arrived for a request reserved at ``sent_at``; the server counted ``tokens``."""
        if not self._adapting:
            return
        now = self._clock()
        self._served.append((now, tokens))
        self._served_tokens += tokens
        self._forget(now)
        if sent_at is None or sent_at >= self._last_cut:
            self._answers += 1
        count, served_tokens = self._served_since_cut
        self._served_since_cut = (count + 1, served_tokens + tokens)
        if self._cut_scale > 0:
            elapsed, self._last_raise = now - self._last_raise, now
            self.scale = min(1.0, self.scale + self._cut_scale * INCREASE_PER_S * elapsed)

    def on_rate_limited(self, sent_at: float | None = None) -> None:
        """A 429 arrived for a request reserved at ``sent_at``: maybe lower the rate.

        A few 429s among many answers are incidental (a gateway hiccup): the Retry-After pause
        covers them. Only when they are at least ``CONGESTED_SHARE`` of the answers to requests
        sent since the last cut is the rate itself too high. Replies to requests sent before
        the last cut are old news and do not cut again.
        """
        if not self._adapting or (sent_at is not None and sent_at < self._last_cut):
            return
        now = self._clock()
        self._limited += 1
        self._answers += 1
        self._forget(now)
        if (
            self._answers < _MIN_SAMPLES
            or self._limited < 3
            or self._limited / self._answers < CONGESTED_SHARE
        ):
            return
        # Cut to just under what the server was seen to serve; without a measure, by DECREASE.
        # After a cut the server's burst allowance is spent, so what it served since then is
        # its sustained rate; before the first cut only the recent window can tell.
        target = DECREASE * self.scale
        if self._last_cut >= 0 and self._served_since_cut[0] >= _MIN_SAMPLES // 2:
            span = max(now - self._last_cut, 1e-3)
            count, tokens = self._served_since_cut
        elif len(self._served) >= _MIN_SAMPLES:
            span = min(max(now - self._served[0][0], 1.0), _WINDOW_S)
            count, tokens = len(self._served), self._served_tokens
        else:
            count = tokens = 0
        if count:
            served = []
            if self.ceiling_rps is not None:
                served.append(count / span / self.ceiling_rps)
            if self.tokens_per_s is not None:
                served.append(tokens / span / self.tokens_per_s)
            target = SERVED_SHARE * min(served)
        self.scale = max(min(target, SERVED_SHARE * self.scale), FLOOR * self.scale, 1e-3)
        self._cut_scale = self.scale
        self._last_cut = self._last_raise = now
        # Slots reserved at the old rate are given up (their holders queue again), so the
        # new rate starts now instead of after a backlog paced too fast.
        self._next_request = self._next_token = now
        self._limited = self._answers = 0
        self._served_since_cut = (0, 0)

    @property
    def _adapting(self) -> bool:
        return self.adaptive and (self.ceiling_rps is not None or self.tokens_per_s is not None)

    def _forget(self, now: float) -> None:
        while self._served and self._served[0][0] < now - _WINDOW_S:
            self._served_tokens -= self._served.popleft()[1]
