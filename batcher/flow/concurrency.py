"""How many requests may be in flight: a fixed number, or ``auto`` sized from what is seen.

``auto`` follows Little's law: to send ``rate`` requests a second that take ``latency``
seconds each, ``rate × latency`` must be in flight; the size uses a high latency (mean plus
twice the mean deviation) and a fifth more, so a slow reply does not stall the pace. With no
rate known it grows by half while the requests in flight are all taken and latency holds, and
shrinks when latency climbs (the server queues instead of answering). Image jobs are also
bounded by the bytes of request bodies in flight, so a grown concurrency cannot hold hundreds
of encoded images.
"""

from __future__ import annotations

import math

INITIAL = 16  # in flight before anything is measured
HEADROOM = 1.2
SLACK = 2  # requests beyond Little's law, for the reply that comes in late
INFLIGHT_BYTES = 256 * 1024 * 1024  # request bodies in flight at most, with auto
_GROWTH = 1.5
_SHRINK = 0.8
_ALPHA = 0.2  # weight of a new latency sample


class ConcurrencySizer:
    """The in-flight limit for a run; ``size`` is called about once a second."""

    def __init__(self, *, cap: int, auto: bool) -> None:
        self.cap = cap
        self.auto = auto
        self.limit = min(INITIAL, cap) if auto else cap
        self.latency_s: float | None = None  # mean of recent successful replies
        self._deviation_s = 0.0
        self._lowest_s: float | None = None
        self._body_bytes: float | None = None
        self.held_by: str | None = None  # what set the limit last: rate, latency, memory, cap

    def observe(self, latency_s: float, body_bytes: int) -> None:
        """One successful reply: its latency and the size of the request that got it."""
        if self.latency_s is None:
            self.latency_s = latency_s
        else:
            self._deviation_s += (abs(latency_s - self.latency_s) - self._deviation_s) * _ALPHA
            self.latency_s += (latency_s - self.latency_s) * _ALPHA
        self._lowest_s = latency_s if self._lowest_s is None else min(self._lowest_s, latency_s)
        if self._body_bytes is None:
            self._body_bytes = float(body_bytes)
        else:
            self._body_bytes += (body_bytes - self._body_bytes) * _ALPHA

    def size(self, rate_rps: float | None, *, saturated: bool) -> int:
        """The limit for the next second, given the request rate in force and whether every
        slot was taken since the last call."""
        if not self.auto or self.latency_s is None:
            return self.limit
        if rate_rps is not None:
            high = self.latency_s + 2 * self._deviation_s
            wanted, self.held_by = math.ceil(rate_rps * high * HEADROOM) + SLACK, "rate"
        else:
            wanted, self.held_by = self._probe(saturated), "latency"
        if self._body_bytes:
            by_memory = max(SLACK, int(INFLIGHT_BYTES // self._body_bytes))
            if by_memory < wanted:
                wanted, self.held_by = by_memory, "memory"
        if wanted >= self.cap:
            wanted, self.held_by = self.cap, "cap"
        self.limit = max(1, wanted)
        return self.limit

    def _probe(self, saturated: bool) -> int:
        assert self.latency_s is not None
        assert self._lowest_s is not None
        queueing = self.latency_s > 2 * self._lowest_s + 0.1
        if queueing:
            return max(SLACK, int(self.limit * _SHRINK))
        if saturated and self.latency_s <= 1.5 * self._lowest_s + 0.05:
            return math.ceil(self.limit * _GROWTH)
        return self.limit
