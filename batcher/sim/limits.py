"""The simulator's rate limits: a token bucket, a fixed window or a sliding window, per budget,
with limits that can change during a run and the headers that advertise them.

Real servers differ in all of these, and a client tuned to one shape can fail on another:
a bucket refills continuously, a fixed window empties at once and refills at its boundary, a
sliding window counts the last ``window_s`` seconds.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from batcher.sim.server import SimSettings

LIMITER_KINDS = ("bucket", "window", "sliding")


class Meter(Protocol):
    per_minute: float

    def take(self, cost: float, now: float) -> float:
        """0 and charge ``cost`` if there is room; else seconds until there would be."""

    def give_back(self, amount: float, now: float) -> None: ...

    def remaining(self, now: float) -> float: ...

    def reset_s(self, now: float) -> float:
        """Seconds until the budget is whole again."""


class Bucket:
    """A token bucket: ``per_minute / 60`` a second, holding ``burst_s`` seconds of it."""

    def __init__(self, per_minute: float, burst_s: float, now: float) -> None:
        self.per_minute = per_minute
        self.burst_s = burst_s
        self.level = self.capacity
        self.updated = now

    @property
    def rate(self) -> float:
        return self.per_minute / 60

    @property
    def capacity(self) -> float:
        return max(1.0, self.rate * self.burst_s)

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, cost: float, now: float) -> float:
        self._refill(now)
        needed = min(cost, self.capacity)
        if self.level >= needed:
            self.level -= cost
            return 0.0
        return (needed - self.level) / self.rate

    def give_back(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def remaining(self, now: float) -> float:
        self._refill(now)
        return max(self.level, 0.0)

    def reset_s(self, now: float) -> float:
        return (self.capacity - self.remaining(now)) / self.rate


class FixedWindow:
    """At most ``per_minute × window_s / 60`` per window; windows start every ``window_s``."""

    def __init__(self, per_minute: float, window_s: float, now: float) -> None:
        self.per_minute = per_minute
        self.window_s = window_s
        self.start = now
        self.used = 0.0

    @property
    def allowance(self) -> float:
        return max(1.0, self.per_minute * self.window_s / 60)

    def _roll(self, now: float) -> None:
        if now >= self.start + self.window_s:
            self.start += math.floor((now - self.start) / self.window_s) * self.window_s
            self.used = 0.0

    def take(self, cost: float, now: float) -> float:
        self._roll(now)
        if self.used + min(cost, self.allowance) <= self.allowance:
            self.used += cost
            return 0.0
        return self.reset_s(now)

    def give_back(self, amount: float, now: float) -> None:
        self._roll(now)
        self.used = max(0.0, self.used - amount)

    def remaining(self, now: float) -> float:
        self._roll(now)
        return max(self.allowance - self.used, 0.0)

    def reset_s(self, now: float) -> float:
        self._roll(now)
        return self.start + self.window_s - now


class SlidingWindow:
    """At most ``per_minute × window_s / 60`` within any ``window_s`` seconds."""

    def __init__(self, per_minute: float, window_s: float, now: float) -> None:
        self.per_minute = per_minute
        self.window_s = window_s
        self.log: deque[tuple[float, float]] = deque()
        self.used = 0.0

    @property
    def allowance(self) -> float:
        return max(1.0, self.per_minute * self.window_s / 60)

    def _forget(self, now: float) -> None:
        while self.log and self.log[0][0] <= now - self.window_s:
            self.used -= self.log.popleft()[1]

    def take(self, cost: float, now: float) -> float:
        self._forget(now)
        if self.used + min(cost, self.allowance) <= self.allowance:
            self.log.append((now, cost))
            self.used += cost
            return 0.0
        # Room comes back as the oldest entries leave the window.
        needed, freed = self.used + min(cost, self.allowance) - self.allowance, 0.0
        for when, amount in self.log:
            freed += amount
            if freed >= needed:
                return when + self.window_s - now
        return self.window_s

    def give_back(self, amount: float, now: float) -> None:
        self._forget(now)
        self.log.append((now, -amount))
        self.used -= amount

    def remaining(self, now: float) -> float:
        self._forget(now)
        return max(self.allowance - self.used, 0.0)

    def reset_s(self, now: float) -> float:
        self._forget(now)
        return self.log[-1][0] + self.window_s - now if self.log else 0.0


def meter(kind: str, per_minute: float, *, burst_s: float, window_s: float, now: float) -> Meter:
    if kind == "bucket":
        return Bucket(per_minute, burst_s, now)
    if kind == "window":
        return FixedWindow(per_minute, window_s, now)
    if kind == "sliding":
        return SlidingWindow(per_minute, window_s, now)
    raise ValueError(f"unknown limiter kind {kind!r}; one of {', '.join(LIMITER_KINDS)}")


def advertise(style: str, meters: dict[str, Meter], now: float) -> dict[str, str]:
    """The rate-limit headers a server of ``style`` (openai or anthropic) sends."""
    headers = {}
    for budget, found in meters.items():
        remaining, reset_s = found.remaining(now), found.reset_s(now)
        if style == "openai":
            headers[f"x-ratelimit-limit-{budget}"] = f"{found.per_minute:.0f}"
            headers[f"x-ratelimit-remaining-{budget}"] = f"{math.floor(remaining)}"
            # Milliseconds, rounded up: a reset rounded down says the limit is whole before it is.
            headers[f"x-ratelimit-reset-{budget}"] = f"{math.ceil(reset_s * 1000) / 1000:.3f}s"
        else:
            # Whole seconds, as Anthropic states it, rounded up: a time cut down to its second
            # says the limit is whole up to a second before it is.
            when = datetime.now(UTC) + timedelta(seconds=reset_s)
            if when.microsecond:
                when = when.replace(microsecond=0) + timedelta(seconds=1)
            headers[f"anthropic-ratelimit-{budget}-limit"] = f"{found.per_minute:.0f}"
            headers[f"anthropic-ratelimit-{budget}-remaining"] = f"{math.floor(remaining)}"
            headers[f"anthropic-ratelimit-{budget}-reset"] = when.isoformat(timespec="seconds")
    return headers


class Limits:
    """The limits one simulator enforces: a meter per budget, and the schedule that moves them.
    ``clock`` is the simulator's (tests on virtual time pass the run's)."""

    def __init__(self, settings: SimSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self.meters: dict[str, Meter] = {}
        self._first_request: float | None = None
        self._schedule = sorted(settings.schedule)
        self.set(settings.requests_per_minute, settings.tokens_per_minute)

    def set(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        """Enforce these limits from now on (None: that budget unlimited)."""
        s, now = self.settings, self._clock()
        for budget, per_minute in (
            ("requests", requests_per_minute),
            ("tokens", tokens_per_minute),
        ):
            if per_minute is None:
                self.meters.pop(budget, None)
            elif budget in self.meters:
                self.meters[budget].per_minute = per_minute
            else:
                self.meters[budget] = meter(
                    s.limiter, per_minute, burst_s=s.burst_s, window_s=s.window_s, now=now
                )

    def follow_schedule(self) -> None:
        now = self._clock()
        if self._first_request is None:
            self._first_request = now
        while self._schedule and now - self._first_request >= self._schedule[0][0]:
            _, per_minute = self._schedule.pop(0)
            self.set(per_minute, self.settings.tokens_per_minute)

    def admit(self, tokens: int) -> float:
        """0 and charge a request of ``tokens`` if every budget has room; else the seconds
        until the fullest one would (and nothing is charged)."""
        now = self._clock()
        charged: list[tuple[Meter, float]] = []
        for budget, cost in (("requests", 1), ("tokens", tokens)):
            found = self.meters.get(budget)
            if found is None:
                continue
            wait = found.take(cost, now)
            if wait > 0:
                for earlier, amount in charged:  # refused: charge nothing
                    earlier.give_back(amount, now)
                return wait
            charged.append((found, cost))
        return 0.0

    def retry_after(self, wait_s: float) -> float | None:
        """The Retry-After of a 429 for a request that would fit in ``wait_s``."""
        s = self.settings
        if not s.send_retry_after:
            return None
        if s.limit_retry_after_s is not None:
            return s.limit_retry_after_s
        # Whole milliseconds, rounded up, as servers state it: a request retried after a wait
        # of a hair (a window's edge reached up to a rounding error) would be refused again
        # and told to wait nothing at all.
        return math.ceil(wait_s * 1000) / 1000

    def give_back_tokens(self, unused: int) -> None:
        """A reply took fewer tokens than max_tokens reserved."""
        if "tokens" in self.meters:
            self.meters["tokens"].give_back(unused, self._clock())

    def advertised(self) -> dict[str, str] | None:
        style = self.settings.ratelimit_headers
        if style is None or not self.meters:
            return None
        return advertise(style, self.meters, self._clock())
