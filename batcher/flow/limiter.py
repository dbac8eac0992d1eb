"""Pacing: spread requests evenly over every budget in force (requests, tokens...).

A GCRA-style scheduler: each request reserves the next free slot on one virtual clock per
budget (one slot per request; its estimated tokens on the token clocks) and sleeps until the
latest of them. Nothing accumulates while idle, so there is never a burst of a minute's
budget. The rates are set from outside (the flow controller decides them); a cut gives up the
slots reserved at the old rate, so the new rate starts at once instead of after a backlog
paced too fast. All state changes happen between awaits: on one event loop no lock is needed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Cost:
    """What one request counts against the budgets: tokens in, and tokens out (a bound)."""

    input_tokens: int = 0
    output_tokens: int = 0

    def of(self, budget: str) -> float:
        if budget == "requests":
            return 1.0
        if budget == "input_tokens":
            return self.input_tokens
        if budget == "output_tokens":
            return self.output_tokens
        return self.input_tokens + self.output_tokens


class RateLimiter:
    """Shared by all workers of a run; ``acquire`` before each request."""

    def __init__(self, *, clock: Clock = time.monotonic, sleep: Sleep = anyio.sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self.rates: dict[str, float] = {}  # per second, by budget; absent: not paced
        self._next: dict[str, float] = {}
        self._last: dict[str, tuple[float, float]] = {}  # (slot start, cost) of the latest
        self.paused_until = 0.0
        self._generation = 0
        self.waiting = 0  # requests sleeping for their slot now
        self.waits = 0  # times a request had to sleep for its slot, ever
        self.halted = False
        self._sleepers: set[anyio.CancelScope] = set()

    def set_rate(self, budget: str, per_s: float | None) -> None:
        """Pace ``budget`` at ``per_s`` from now on (None: stop pacing it)."""
        old = self.rates.get(budget)
        if per_s is None:
            self.rates.pop(budget, None)
            self._next.pop(budget, None)
            self._last.pop(budget, None)
            return
        self.rates[budget] = per_s
        if old is None or per_s < old * 0.999:
            # Slots reserved at the old rate are given up: their holders queue again, the
            # first one a slot at the new rate after the latest request that went.
            start, cost = self._last.get(budget, (float("-inf"), 0.0))
            self._next[budget] = max(self._clock(), start + cost / per_s)
            self._generation += 1

    async def acquire(self, cost: Cost = Cost()) -> None:
        """Wait for this request's slot on every paced budget."""
        while True:
            now = self._clock()
            if not self.rates and now >= self.paused_until:
                return  # nothing paced: the common case of an unlimited server
            if self.halted:
                return  # the place is refused once granted: nothing left to pace
            if now < self.paused_until:
                await self._wait(self.paused_until - now)
                continue
            start = max([now, *self._next.values()])
            generation = self._generation
            for budget, rate in self.rates.items():
                self._next[budget] = start + cost.of(budget) / rate
            if start > now:
                await self._wait(start - now)
            if self.halted:
                return
            if self._clock() >= self.paused_until and generation == self._generation:
                for budget in self.rates:
                    self._last[budget] = (start, cost.of(budget))
                return
            # Paused, or a rate was cut, while this request slept on an old slot: queue again.

    async def _wait(self, seconds: float) -> None:
        """Sleep for a slot; ``halt`` cuts it short. Only requests that must wait pay for
        the cancel scope (about 4 µs)."""
        self.waiting += 1
        self.waits += 1
        try:
            with anyio.CancelScope() as scope:
                self._sleepers.add(scope)
                try:
                    await self._sleep(seconds)
                finally:
                    self._sleepers.discard(scope)
        finally:
            self.waiting -= 1

    def halt(self) -> None:
        """The run stopped: wake every request sleeping for its slot, and pace nothing more."""
        self.halted = True
        for scope in self._sleepers:
            scope.cancel()

    def settle(self, estimated: Cost, actual: Cost) -> None:
        """Correct the token clocks with the server's usage once the reply is in."""
        for budget, rate in self.rates.items():
            if budget != "requests" and budget in self._next:
                self._next[budget] += (actual.of(budget) - estimated.of(budget)) / rate

    def pause_until(self, until: float) -> None:
        """Stop every request until ``until`` (the server said when it takes requests again)."""
        if until > self.paused_until:
            self.paused_until = until
            for budget in self._next:
                self._next[budget] = max(self._next[budget], until)
