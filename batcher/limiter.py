"""Pacing: requests/minute and tokens/minute for every worker of a run, spread evenly.

The limiter is a GCRA-style scheduler: each request reserves the next free slot on a virtual
clock (one slot per request, and its estimated tokens on a second clock) and sleeps until it.
Nothing accumulates while idle, so there is never a burst of a minute's budget. All state
changes happen between awaits, so on one event loop no lock is needed.

Adaptive mode is AIMD on the rate: a 429 cuts it (to what the server was seen to answer in the
last seconds, at most to ``DECREASE`` of the current rate), and quiet time raises it back by a
small step each second, up to the configured ceiling. With no rate configured, the first 429
gives the limiter one, learned from what the server was answering.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable

import anyio

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

DECREASE = 0.7  # multiplicative decrease bound on a 429
FLOOR = 0.25  # never cut below this share of the current rate in one step
INCREASE_PER_S = 0.01  # additive increase, as a share of the rate set at the last cut
COOLDOWN_S = 1.0  # 429s closer together than this are one congestion event
_WINDOW_S = 10.0


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
        # `scale` multiplies both configured rates; an unconfigured request rate learns one.
        self.scale = 1.0
        self.learned_rps: float | None = None
        self._next_request = 0.0
        self._next_token = 0.0
        self._paused_until = 0.0
        self._last_cut = -COOLDOWN_S
        self._last_raise = 0.0
        self._cut_scale = 0.0
        self._served: deque[tuple[float, int]] = deque()
        self._served_tokens = 0

    @property
    def requests_per_s(self) -> float | None:
        """The request rate in force now (None: unpaced)."""
        if self.ceiling_rps is not None:
            return self.ceiling_rps * self.scale
        return self.learned_rps

    async def acquire(self, tokens: int = 0) -> None:
        """Wait for this request's slot; ``tokens`` is its estimated token cost."""
        while True:
            now = self._clock()
            if now < self._paused_until:
                await self._sleep(self._paused_until - now)
                continue
            start = max(now, self._next_request, self._next_token)
            rate = self.requests_per_s
            if rate is not None:
                self._next_request = start + 1 / rate
            if self.tokens_per_s is not None:
                self._next_token = start + tokens / (self.tokens_per_s * self.scale)
            if start > now:
                await self._sleep(start - now)
            if self._clock() >= self._paused_until:
                return
            # A 429 paused everyone while this request slept: queue again after the pause.

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

    def on_success(self, tokens: int = 0) -> None:
        """A reply arrived; ``tokens`` is what the server counted for it."""
        if not self.adaptive:
            return
        now = self._clock()
        self._served.append((now, tokens))
        self._served_tokens += tokens
        while self._served and self._served[0][0] < now - _WINDOW_S:
            self._served_tokens -= self._served.popleft()[1]
        if self._cut_scale <= 0:
            return
        elapsed, self._last_raise = now - self._last_raise, now
        if self._paced:
            self.scale = min(1.0, self.scale + self._cut_scale * INCREASE_PER_S * elapsed)
        elif self.learned_rps is not None:
            self.learned_rps += self._cut_scale * INCREASE_PER_S * elapsed

    def on_rate_limited(self) -> None:
        """A 429 arrived: in adaptive mode, lower the rate once per congestion event."""
        now = self._clock()
        if not self.adaptive or now - self._last_cut < COOLDOWN_S:
            return
        self._last_cut = self._last_raise = now
        served_rps, served_tps = self._served_rates(now)
        if not self._paced:
            # Nothing configured: start from what the server was answering.
            self.learned_rps = max(served_rps * DECREASE, 0.1) if served_rps else 1.0
            self._cut_scale = self.learned_rps
            return
        # Cut to what the server was seen to serve, bounded between FLOOR and DECREASE.
        target = DECREASE * self.scale
        if self.ceiling_rps is not None and served_rps:
            target = min(target, 0.95 * served_rps / self.ceiling_rps)
        if self.tokens_per_s is not None and served_tps:
            target = min(target, 0.95 * served_tps / self.tokens_per_s)
        self.scale = max(target, FLOOR * self.scale, 1e-4)
        self._cut_scale = self.scale

    @property
    def _paced(self) -> bool:
        return self.ceiling_rps is not None or self.tokens_per_s is not None

    def _served_rates(self, now: float) -> tuple[float, float]:
        if len(self._served) < 2:
            return 0.0, 0.0
        span = max(now - self._served[0][0], 1.0)
        return len(self._served) / span, self._served_tokens / span
