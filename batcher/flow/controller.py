"""The flow controller: how fast, and how many at once, for every request of a run.

Design. Each budget (requests, tokens, input and output tokens per minute) is paced at the
lowest of what is known about it (``rates.py``), from three sources: the job's ``limits`` (a
ceiling the user sets), the server's rate-limit headers (the limit it states), and discovery
(the rate it was seen to serve when congested; see ``discovery.py``). With none known, requests
go unpaced. A 429 always delays its own retry (the retry policy waits at least its Retry-After)
and is evidence about the shared rate only through discovery's trials; under a request limit
the server states, requests stay within what its replies say remains and a 429 makes only a
small cut for a moment (``room.py``). Everyone waits a 429's Retry-After only when it speaks
for everyone (``pauses.py``): more than half of the recent answers are 429s, or the headers say
no requests remain; when congestion is only suspected (and no trial is already answering it,
unless that trial's cut is plainly too shallow), a second at most. In flight: a fixed number,
or ``auto`` (``concurrency.py``). ``tick`` runs once a second: growth, sizing, and what bounds
the run.
A server that answers nothing but 429 for ``stall_timeout_s``, or asks for a longer wait (a
Retry-After, a pause until its limit resets, a stated rate slower than one request in that
time), is reported ``stalled``: no wait the server asks for outlasts the stall timeout.
Once the run stops, ``halt`` grants no place again: waiters for one are woken and refused, and
so is a request whose place comes after the stop (``Halted``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import TracebackType

import anyio

from batcher.config import LimitsConfig
from batcher.flow.concurrency import ConcurrencySizer
from batcher.flow.discovery import Discovery
from batcher.flow.limiter import Clock, Cost, RateLimiter, Sleep
from batcher.flow.pauses import PausePolicy
from batcher.flow.rates import HEADER_SHARE, RatesInForce
from batcher.flow.room import StatedRoom
from batcher.flow.server_limits import ServerLimits


@dataclass(frozen=True, slots=True)
class FlowStatus:
    """A snapshot for the progress line."""

    requests_per_minute: float | None  # the request rate in force (None: unpaced)
    source: str | None  # job, headers or discovered
    in_flight: int
    concurrency: int
    bound: str | None  # rate, server, concurrency or memory; None: nothing holds requests

    def describe(self) -> str:
        rate = (
            f"{self.requests_per_minute:,.0f}/min ({self.source})"
            if self.requests_per_minute is not None
            else "unpaced"
        )
        return f"rate {rate}, in flight {self.in_flight}/{self.concurrency} ({self.bound or '-'})"

    @classmethod
    def of(cls, flow: FlowController) -> FlowStatus:
        rps = flow.rates.equivalent_rps()
        return cls(
            requests_per_minute=rps * 60 if rps is not None else None,
            source=flow.rates.binding_source(),
            in_flight=flow.in_flight,
            concurrency=flow.concurrency,
            bound=flow.bound(),
        )


@dataclass(slots=True)
class FlowReport:
    """What the summary says of flow: the limits seen and what bound the run."""

    job: dict[str, float] = field(default_factory=dict)
    headers: dict[str, float] = field(default_factory=dict)
    header_style: str | None = None
    discovered_rpm: float | None = None
    lowest_discovered_rpm: float | None = None
    cuts: int = 0
    noise_share: float = 0.0
    bound_seconds: dict[str, float] = field(default_factory=dict)
    concurrency: int = 0
    concurrency_cap: int = 0
    concurrency_auto: bool = True

    @classmethod
    def of(cls, flow: FlowController) -> FlowReport:
        found, lowest = flow.discovery.rate_rps, flow.discovery.lowest_rps
        return cls(
            job={b: r * 60 for b, r in flow.rates.job.items()},
            headers={b: r * 60 / HEADER_SHARE for b, r in flow.rates.headers.items()},
            header_style=flow.rates.header_style,
            discovered_rpm=found * 60 if found is not None else None,
            lowest_discovered_rpm=lowest * 60 if lowest is not None else None,
            cuts=flow.discovery.cuts,
            noise_share=flow.discovery.noise_share,
            bound_seconds=dict(flow.bound_seconds),
            concurrency=flow.concurrency,
            concurrency_cap=flow.sizer.cap,
            concurrency_auto=flow.sizer.auto,
        )


class Halted(Exception):  # noqa: N818 - a signal between flow and worker, not an error
    """The run stopped dispatching: this request is not sent; its row is left to the next run."""


class Slot:
    """One request's place: pass what came back to ``answered`` or ``rate_limited``."""

    __slots__ = ("body_bytes", "cost", "epoch", "flow", "sent_at")

    def __init__(self, flow: FlowController, cost: Cost, epoch: int, sent_at: float) -> None:
        self.flow, self.cost, self.epoch, self.sent_at = flow, cost, epoch, sent_at
        self.body_bytes = 0

    def answered(self, usage: Cost, limits: ServerLimits | None = None) -> None:
        self.flow._answered(self, usage, limits)

    def rate_limited(self, retry_after_s: float | None, limits: ServerLimits | None = None) -> None:
        self.flow._rate_limited(self, retry_after_s, limits)

    def failed(
        self, limits: ServerLimits | None = None, retry_after_s: float | None = None
    ) -> None:
        """Any other answer: the server is alive, though this request failed."""
        self.flow._failed(limits, retry_after_s)


class Place:
    """``async with flow.slot(cost) as slot``: one request's place in flight, held around its
    send. A class rather than an ``@asynccontextmanager``: the async generator, the loop's hook
    for it and contextlib's wrapper ran for every request (entering and leaving a free place
    took 2.7 µs that way, 1.0 µs this way, with the gate's borrower below; measured)."""

    __slots__ = ("cost", "flow")

    def __init__(self, flow: FlowController, cost: Cost) -> None:
        self.flow, self.cost = flow, cost

    async def __aenter__(self) -> Slot:
        flow = self.flow
        gate = flow._gate
        # The place itself borrows the token, not the current task: anyio looks the task up
        # (twice per request) only to have an object to hold it by.
        try:
            # A free place is taken without a trip round the event loop, which anyio's
            # acquire makes every time (a tenth of the client's CPU per request).
            gate.acquire_on_behalf_of_nowait(self)
        except anyio.WouldBlock:
            flow._gate_waits += 1
            await gate.acquire_on_behalf_of(self)
        try:
            await flow.pacer.acquire(self.cost)
        except BaseException:
            gate.release_on_behalf_of(self)
            raise
        # A place that comes after the stop is refused: workers that waited for one must not
        # send once the run stopped. One attribute read per request.
        if flow.halted:
            gate.release_on_behalf_of(self)
            raise Halted
        flow.in_flight += 1
        if flow.room.remaining is not None:
            flow._sent()
        return Slot(flow, self.cost, flow.discovery.epoch, flow._clock())

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        flow = self.flow
        flow.in_flight -= 1
        flow._gate.release_on_behalf_of(self)


class FlowController:
    """Shared by all workers of a run: ``async with flow.slot(cost) as slot`` around a send."""

    def __init__(
        self,
        limits: LimitsConfig,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
        pacer: RateLimiter | None = None,  # --ray: a pacer that leases from a shared budget
    ) -> None:
        self._clock = clock
        self.pacer = pacer if pacer is not None else RateLimiter(clock=clock, sleep=sleep)
        self.adaptive = limits.adaptive
        self.discovery = Discovery()
        self.stall_timeout_s = limits.stall_timeout_s
        self.pauses = PausePolicy(
            self.discovery,
            adaptive=limits.adaptive,
            stall_timeout_s=limits.stall_timeout_s,
            now=clock(),
        )
        auto = limits.concurrency == "auto"
        cap = limits.max_concurrency if auto else int(limits.concurrency)
        self.sizer = ConcurrencySizer(cap=cap, auto=auto)
        self._gate = anyio.CapacityLimiter(self.sizer.limit)
        self.rates = RatesInForce(limits, self.pacer, self.discovery)
        self.room = StatedRoom()
        self.in_flight = 0
        self.halted = False  # the run stopped dispatching: no place is granted any more
        self._backoffs: set[anyio.CancelScope] = set()
        self._gate_waits = 0
        self._last_tick = clock()
        self._last_pacer_waits = 0
        self._last_gate_waits = 0
        self.bound_seconds: dict[str, float] = {}

    # -- the worker's side ------------------------------------------------------------------

    def slot(self, cost: Cost) -> Place:
        """Wait for room in flight and for the pace, then hold the request's place."""
        return Place(self, cost)

    async def backoff(self, sleep: Sleep, seconds: float) -> None:
        """A retry's wait, cut short when the flow halts (the retry is then refused its place).
        Only failed attempts wait here, so the cancel scope costs nothing on the hot path."""
        if self.halted:
            return
        with anyio.CancelScope() as scope:
            self._backoffs.add(scope)
            try:
                await sleep(seconds)
            finally:
                self._backoffs.discard(scope)

    def _answered(self, slot: Slot, usage: Cost, limits: ServerLimits | None) -> None:
        now = self._clock()
        self.pauses.answered(now)
        if limits is not None:
            self._read_headers(limits)
        self.pacer.settle(slot.cost, usage)
        self.sizer.observe(now - slot.sent_at, slot.body_bytes)
        self.rates.learn_cost(usage)
        if self.stated:
            self.room.answered(now, limited=False)
        elif self.adaptive and self.discovery.record(
            now, slot.epoch, limited=False, pacing=self.rates.equivalent_rps
        ):
            self.rates.apply()

    def _rate_limited(
        self, slot: Slot, retry_after_s: float | None, limits: ServerLimits | None
    ) -> None:
        now = self._clock()
        self.pauses.refused()
        if limits is not None:
            self._read_headers(limits)
        if self.stated:
            # The limit is known: its edge was met, a small cut for a moment answers it.
            self.room.answered(now, limited=True)
            self._follow_room(now)
        elif self.adaptive and self.discovery.record(
            now, slot.epoch, limited=True, pacing=self.rates.equivalent_rps
        ):
            self.rates.apply()
        if retry_after_s:
            self.pauses.asked(retry_after_s, "Retry-After")
            pause = self.pauses.everyone_waits(now, retry_after_s)
            if self.stated and self.room.full(limits):
                pause = retry_after_s  # none remain: its wait for room is everyone's
            if pause:
                self.pacer.pause_until(now + pause)

    def _failed(self, limits: ServerLimits | None, retry_after_s: float | None = None) -> None:
        self.pauses.progressed(self._clock())
        if retry_after_s:
            self.pauses.asked(retry_after_s, "Retry-After")  # the retry waits at least this
        if limits is not None:
            self._read_headers(limits)

    def _sent(self) -> None:
        """A request went under a stated limit: hold everyone when it took the last room."""
        now, rps = self._clock(), self.rates.requests_per_s
        hold = self.room.sent(now, 1 / rps if rps else 0.0)
        if hold:
            self.pacer.pause_until(now + hold)

    def _follow_room(self, now: float) -> None:
        share = 1.0 if self.room.doubted else self.room.share(now)
        if share != self.rates.stated_cut:
            self.rates.stated_cut = share
            self.rates.apply()

    @property
    def stated(self) -> bool:
        """The server states its request limit: that is the target, not discovery's (unless
        429s kept coming under it: then discovery finds what is enforced)."""
        return "requests" in self.rates.headers and not self.room.doubted

    def _read_headers(self, limits: ServerLimits) -> None:
        if not self.adaptive:
            return  # adaptive: false paces at the job's limits exactly
        if self.rates.read_headers(limits):
            # 429s to requests sent before the server's limit was known say nothing of it.
            self.discovery.forget_recent()
        requests = limits.budgets.get("requests")
        if requests is not None:
            self.room.read(requests, self._clock())
        if requests is not None and requests.remaining is not None and requests.remaining < 1:
            wait = 60 / requests.per_minute
            if requests.reset_s is not None:
                wait = min(wait, requests.reset_s)
            self.pauses.asked(wait, "until its request limit resets")
            self.pacer.pause_until(self._clock() + wait)

    # -- the run's side ---------------------------------------------------------------------

    def halt(self) -> None:
        """Grant no place from now on: every stop ends dispatch at once. Requests in flight go
        on; whoever waits for a place, for the pace or to retry is woken and refused."""
        if self.halted:
            return
        self.halted = True
        # Waiters for room in flight need no wake-up: each place given back (by a woken
        # waiter at once, by a request in flight when it ends) goes to the next, who is
        # refused and gives it back in turn; the run waits for those in flight anyway.
        self.pacer.halt()
        for scope in self._backoffs:
            scope.cancel()

    @property
    def concurrency(self) -> int:
        """Requests allowed in flight now."""
        return int(self._gate.total_tokens)

    @property
    def requests_per_s(self) -> float | None:
        """The request rate in force, or None when requests are not paced."""
        return self.rates.requests_per_s

    def tick(self) -> None:
        """Once a second: grow the discovered rate, size concurrency, note what binds."""
        now = self._clock()
        elapsed, self._last_tick = now - self._last_tick, now
        pace_binds = self.pacer.waits > self._last_pacer_waits
        saturated = self._gate_waits > self._last_gate_waits
        self._last_pacer_waits, self._last_gate_waits = self.pacer.waits, self._gate_waits
        if self.adaptive:
            if "requests" in self.rates.headers:
                self._follow_room(now)
            self.discovery.grow(now, elapsed, pace_binds=pace_binds)
            ceiling = self.rates.stated_requests_per_s()
            found = self.discovery.rate_rps
            if found is not None and ceiling is not None and found >= ceiling:
                self.discovery.release()
            self.rates.apply()
            interval = self.rates.headers_interval_s()
            if interval is not None:
                self.pauses.asked(interval, "between requests, at the rate its headers state")
        limit = self.sizer.size(self.rates.equivalent_rps(), saturated=saturated)
        if limit != self._gate.total_tokens:
            self._gate.total_tokens = limit
        bound = self.bound()
        if bound is not None:
            self.bound_seconds[bound] = self.bound_seconds.get(bound, 0.0) + elapsed

    def stalled(self) -> bool:
        """Nothing but 429s for ``stall_timeout_s``, or a wait asked longer than that."""
        return self.stall() is not None

    def stall(self) -> str | None:
        """Why the run has stalled (the run's final line), or None while it has not."""
        return self.pauses.stall(self._clock())

    def bound(self) -> str | None:
        """What holds requests back now: rate, server, concurrency or memory."""
        if self._clock() < self.pacer.paused_until:
            return "server"
        if self.pacer.waiting:
            return "rate" if self.rates.binding_source() == "job" else "server"
        if self._gate.available_tokens <= 0:  # every place in flight is taken
            held = self.sizer.held_by if self.sizer.auto else "cap"
            if held == "rate":
                return "rate" if self.rates.binding_source() == "job" else "server"
            return {"cap": "concurrency", "memory": "memory"}.get(held or "", "server")
        return None

    def status(self) -> FlowStatus:
        return FlowStatus.of(self)

    def report(self) -> FlowReport:
        return FlowReport.of(self)
