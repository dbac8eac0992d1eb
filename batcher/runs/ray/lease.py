"""One pace for many processes: the shared side grants slices of it, the workers lease them.

The shared side (``SharedPace``, run by one Ray actor) is the flow controller of a one-machine
run with its pacer swapped for ``ReservingLimiter``: the same virtual clocks (``limiter.py``), the
same discovery and Retry-After rules (``flow.py``), fed with the answers every worker reports.
It never waits: asked for slots, it reserves those that start within ``HORIZON_S`` and answers
at once, with "come back at t" for the rest. An actor whose calls waited would fill its slots
with sleepers and deadlock the workers queued behind them.

The worker side (``LeasedPacer``) stands in for the pacer of a shard's own flow controller:
requests queue locally, one of them asks the shared side for slots for the whole queue, and
each sleeps until its slot. Times crossing processes are wall-clock (``time.time``): monotonic
clocks of two hosts share no origin. Pure: the lease source and the clocks are injected.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from batcher.config import LimitsConfig
from batcher.flow.controller import FlowController, Slot
from batcher.flow.limiter import Clock, Cost, RateLimiter, Sleep
from batcher.flow.server_limits import ServerLimits

_FREE = Cost()
HORIZON_S = 0.5  # slots are granted at most this far ahead: a cut or a pause binds within it
MAX_LEASE = 64  # slots asked for in one call
SAVE_EVERY_S = 1.0  # the shared state is checkpointed at most this often


@dataclass(frozen=True, slots=True)
class Grant:
    """Send times (wall clock) for the first ``len(starts)`` costs asked, in order; with
    ``retry_at`` set, the rest were refused: ask again then."""

    starts: tuple[float, ...]
    retry_at: float | None
    epoch: int = 0  # the shared discovery's epoch: answers carry it back


@dataclass(frozen=True, slots=True)
class Answer:
    """One reply a worker saw, reported to the shared pace."""

    kind: str  # answered, rate_limited or failed
    cost: Cost
    sent_at: float  # wall clock
    epoch: int
    usage: Cost | None = None
    retry_after_s: float | None = None
    limits: ServerLimits | None = None


@dataclass(slots=True)
class PaceState:
    """What survives a restart of the shared pace: where its clocks stood and why."""

    saved_at: float
    next_free: dict[str, float] = field(default_factory=dict)
    paused_until: float = 0.0
    discovered_rps: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "saved_at": self.saved_at,
            "next_free": self.next_free,
            "paused_until": self.paused_until,
            "discovered_rps": self.discovered_rps,
        }

    @classmethod
    def of_json(cls, data: dict[str, Any]) -> PaceState:
        return cls(
            saved_at=float(data["saved_at"]),
            next_free={str(k): float(v) for k, v in data["next_free"].items()},
            paused_until=float(data["paused_until"]),
            discovered_rps=None
            if data["discovered_rps"] is None
            else float(data["discovered_rps"]),
        )


class ReservingLimiter(RateLimiter):
    """``RateLimiter``'s clocks, reserved without waiting."""

    def grant(self, costs: Sequence[Cost], horizon_s: float = HORIZON_S) -> tuple[float, ...]:
        """Reserve slots for ``costs`` in order, as many as start within ``horizon_s``."""
        now = self._clock()
        starts: list[float] = []
        for cost in costs:
            if now < self.paused_until:
                break
            if not self.rates:
                starts.append(now)
                continue
            start = max([now, *self._next.values()])
            if start > now + horizon_s:
                break
            for budget, rate in self.rates.items():
                self._next[budget] = start + cost.of(budget) / rate
            starts.append(start)
        if len(starts) < len(costs) or (starts and starts[-1] > now):
            self.waits += 1  # the pace held requests back (discovery grows only then)
        return tuple(starts)

    def retry_at(self, horizon_s: float = HORIZON_S) -> float:
        """When slots refused now may be granted: the pause's end, or when the next slot is
        within the horizon."""
        now = self._clock()
        if now < self.paused_until:
            return self.paused_until
        return max([now + 0.001, *(t - horizon_s for t in self._next.values())])

    def snapshot(self) -> dict[str, float]:
        return dict(self._next)

    def restore(self, next_free: dict[str, float], not_before: float) -> None:
        """Start every clock no earlier than ``not_before``: slots granted after the last
        checkpoint are unknown, and granting them again would be a burst."""
        for budget in self.rates:
            self._next[budget] = max(next_free.get(budget, 0.0), not_before)


class SharedPace:
    """The job's pace for all workers together: rates, the discovered limit, the pauses."""

    def __init__(self, limits: LimitsConfig, *, clock: Clock = time.time) -> None:
        self._clock = clock
        self.pacer = ReservingLimiter(clock=clock)
        self.flow = FlowController(limits, clock=clock, pacer=self.pacer)
        self._last_tick = clock()
        self.granted = 0

    def lease(self, costs: Sequence[Cost], answers: Sequence[Answer] = ()) -> Grant:
        """Slots for ``costs``; never waits."""
        self.report(answers)
        self._tick()
        starts = self.pacer.grant(costs)
        self.granted += len(starts)
        retry_at = self.pacer.retry_at() if len(starts) < len(costs) else None
        return Grant(starts, retry_at, self.flow.discovery.epoch)

    def report(self, answers: Sequence[Answer]) -> None:
        """Replies seen by the workers: they move the shared rates as the local ones would."""
        for answer in answers:
            slot = Slot(self.flow, answer.cost, answer.epoch, answer.sent_at)
            if answer.kind == "answered":
                slot.answered(answer.usage or answer.cost, answer.limits)
            elif answer.kind == "rate_limited":
                slot.rate_limited(answer.retry_after_s, answer.limits)
            else:
                slot.failed(answer.limits)

    def _tick(self) -> None:
        """The flow controller's once-a-second clockwork, run when a call comes."""
        now = self._clock()
        if now - self._last_tick >= 1.0:
            self._last_tick = now
            self.flow.tick()

    def describe(self) -> str:
        """For the driver's status line: slots granted and the rate in force."""
        status = self.flow.status()
        rate = status.requests_per_minute
        pace = f"{rate:,.0f}/min ({status.source})" if rate is not None else "unpaced"
        return f"{self.granted:,} requests sent, rate {pace}"

    def state(self) -> PaceState:
        found = self.flow.discovery.rate_rps
        return PaceState(
            saved_at=self._clock(),
            next_free=self.pacer.snapshot(),
            paused_until=self.pacer.paused_until,
            discovered_rps=found,
        )

    def restore(self, state: PaceState) -> None:
        """Take up where a previous incarnation stopped, without granting its slots again."""
        discovery = self.flow.discovery
        if state.discovered_rps is not None and self.flow.adaptive:
            discovery.rate_rps = discovery.lowest_rps = state.discovered_rps
            self.flow.tick()  # applies the discovered rate to the pacer
        self.pacer.pause_until(state.paused_until)
        self.pacer.restore(state.next_free, state.saved_at + SAVE_EVERY_S + HORIZON_S)


class LeaseSource(Protocol):
    """Where a worker's slots come from (the limits actor, or the shared pace itself)."""

    async def lease(self, costs: Sequence[Cost], answers: Sequence[Answer]) -> Grant: ...

    def report(self, answers: Sequence[Answer]) -> None:
        """Send answers without waiting for them to arrive."""


class _Waiter:
    __slots__ = ("cost", "event", "start")

    def __init__(self, cost: Cost) -> None:
        self.cost = cost
        self.start: float | None = None
        self.event = anyio.Event()


class LeasedPacer(RateLimiter):
    """A shard's pacer: slots come from the shared pace, not from local clocks.

    Rates, pauses and token corrections set by the shard's own flow controller are the
    shared side's business and are ignored here; answers reach it through ``SharedFlow``.
    """

    def __init__(
        self,
        source: LeaseSource,
        *,
        wall: Clock = time.time,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        super().__init__(clock=wall, sleep=sleep)
        self.source = source
        self._wall = wall
        self._queue: deque[_Waiter] = deque()
        self._leader: _Waiter | None = None
        self.epoch = 0
        self.answers: list[Answer] = []  # reported with the next lease, or by ``flush``

    def set_rate(self, budget: str, per_s: float | None) -> None:
        """The shared pace sets the rates."""

    def pause_until(self, until: float) -> None:
        """The shared pace decides who pauses."""

    def settle(self, estimated: Cost, actual: Cost) -> None:
        """The shared pace settles token clocks from the reported usage."""

    def flush(self) -> None:
        if self.answers:
            answers, self.answers = self.answers, []
            self.source.report(answers)

    def halt(self) -> None:
        super().halt()
        for waiter in self._queue:
            waiter.event.set()  # each sees ``halted`` and leaves the queue

    async def acquire(self, cost: Cost = _FREE) -> None:
        waiter = _Waiter(cost)
        self._queue.append(waiter)
        try:
            while waiter.start is None:
                if self.halted:
                    return  # the place is refused: no lease for it
                if self._leader is None:
                    self._leader = waiter
                    try:
                        await self._lead(waiter)
                    finally:
                        self._leader = None
                        if self._queue:
                            self._queue[0].event.set()  # the next in line leads now
                else:
                    await waiter.event.wait()
                    waiter.event = anyio.Event()
        finally:
            if waiter.start is None:
                self._queue.remove(waiter)
        if self.halted:
            return
        delay = waiter.start - self._wall()
        if delay > 0:
            await self._wait(delay)

    async def _lead(self, me: _Waiter) -> None:
        """Ask for slots for the queue (the leader first) until the leader has one."""
        while me.start is None and not self.halted:
            asked = [self._queue[i] for i in range(min(len(self._queue), MAX_LEASE))]
            answers, self.answers = self.answers, []
            grant = await self.source.lease([w.cost for w in asked], answers)
            self.epoch = grant.epoch
            for waiter, start in zip(asked, grant.starts, strict=False):
                waiter.start = start
                self._queue.remove(waiter)
                if waiter is not me:
                    waiter.event.set()
            if me.start is None and grant.retry_at is not None:
                await self._wait(max(grant.retry_at - self._wall(), 0.0))


class SharedFlow(FlowController):
    """A shard's flow controller: paced by leases, its answers reported to the shared pace.

    The shard's own controller keeps what is local (the requests in flight, its progress
    line) and runs non-adaptive: discovery and Retry-After pauses are decided once, on the
    answers of every worker, by the shared pace.
    """

    def __init__(self, limits: LimitsConfig, pacer: LeasedPacer) -> None:
        super().__init__(limits.model_copy(update={"adaptive": False}), pacer=pacer)
        self.leased = pacer

    def _sent_at(self, slot: Slot) -> float:
        return self.leased._wall() - (self._clock() - slot.sent_at)

    def _answered(self, slot: Slot, usage: Cost, limits: ServerLimits | None) -> None:
        super()._answered(slot, usage, limits)
        self.leased.answers.append(
            Answer(
                "answered", slot.cost, self._sent_at(slot), self.leased.epoch, usage, None, limits
            )
        )

    def _rate_limited(
        self, slot: Slot, retry_after_s: float | None, limits: ServerLimits | None
    ) -> None:
        super()._rate_limited(slot, retry_after_s, limits)
        self.leased.answers.append(
            Answer(
                "rate_limited",
                slot.cost,
                self._sent_at(slot),
                self.leased.epoch,
                None,
                retry_after_s,
                limits,
            )
        )
        self.leased.flush()  # a 429 slows everyone: it goes at once

    def tick(self) -> None:
        super().tick()
        self.leased.flush()
