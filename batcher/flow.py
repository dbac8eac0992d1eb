"""The flow controller: how fast, and how many at once, for every request of a run.

Design. Each budget (requests, tokens, input and output tokens per minute) is paced at the
lowest of what is known about it, from three sources: the job's ``limits`` (a ceiling the user
sets), the server's rate-limit headers (the limit it states), and discovery (the rate it was
seen to serve when congested; see ``discovery.py``). With none known, requests go unpaced.
A 429 always delays its own retry (the retry policy waits at least its Retry-After) and is
evidence about the shared rate only through discovery's trials. Everyone waits a 429's
Retry-After only when it speaks for everyone: more than half of the recent answers are 429s,
or the headers say no requests remain; when congestion is only suspected (and no trial is
already answering it, unless that trial's cut is plainly too shallow), a second at most.
In flight: a fixed number, or ``auto`` (``concurrency.py``). ``tick`` runs once a second:
growth, sizing, and what bounds the run.
A server that answers nothing but 429 for ``stall_timeout_s`` is reported ``stalled``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from batcher.concurrency import ConcurrencySizer
from batcher.config import LimitsConfig
from batcher.discovery import Discovery
from batcher.limiter import Clock, Cost, RateLimiter, Sleep
from batcher.server_limits import BUDGETS, ServerLimits

SUSPECTED_PAUSE_S = 1.0  # the longest everyone waits on a 429 when congestion is suspected
HEADER_SHARE = 0.98  # of a limit the server states in headers, what is used
_REFUSING_WINDOW = 20  # answers the "server refuses nearly everything" share is judged on


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

    def failed(self, limits: ServerLimits | None = None) -> None:
        """Any other answer: the server is alive, though this request failed."""
        self.flow._progressed(limits)


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
        auto = limits.concurrency == "auto"
        cap = limits.max_concurrency if auto else int(limits.concurrency)
        self.sizer = ConcurrencySizer(cap=cap, auto=auto)
        self._gate = anyio.CapacityLimiter(self.sizer.limit)
        self.job: dict[str, float] = {}
        if limits.requests_per_minute:
            self.job["requests"] = limits.requests_per_minute / 60
        if limits.tokens_per_minute:
            self.job["tokens"] = limits.tokens_per_minute / 60
        self.headers: dict[str, float] = {}
        self.header_style: str | None = None
        self._header_key: tuple[tuple[str, float], ...] = ()
        self._in_force: dict[str, tuple[float, str]] = {}  # budget: (per second, source)
        self._mean_cost: dict[str, float] = {}
        self.in_flight = 0
        self._gate_waits = 0
        self._last_tick = clock()
        self._last_pacer_waits = 0
        self._last_gate_waits = 0
        self._last_progress = clock()
        self._limited_since_progress = 0
        self._recent: deque[bool] = deque(maxlen=_REFUSING_WINDOW)
        self.bound_seconds: dict[str, float] = {}
        self._apply()

    # -- the worker's side ------------------------------------------------------------------

    @asynccontextmanager
    async def slot(self, cost: Cost) -> AsyncIterator[Slot]:
        """Wait for room in flight and for the pace, then hold the request's place."""
        if self._gate.available_tokens < 1:
            self._gate_waits += 1
        async with self._gate:
            await self.pacer.acquire(cost)
            slot = Slot(self, cost, self.discovery.epoch, self._clock())
            self.in_flight += 1
            try:
                yield slot
            finally:
                self.in_flight -= 1

    def _answered(self, slot: Slot, usage: Cost, limits: ServerLimits | None) -> None:
        now = self._clock()
        self._progressed(limits)
        self._recent.append(False)
        self.pacer.settle(slot.cost, usage)
        self.sizer.observe(now - slot.sent_at, slot.body_bytes)
        for budget in self._in_force:
            mean = self._mean_cost.get(budget, usage.of(budget))
            self._mean_cost[budget] = mean + (usage.of(budget) - mean) * 0.05
        if self.adaptive and self.discovery.record(
            now, slot.epoch, limited=False, pacing=self._equivalent_rps
        ):
            self._apply()

    def _rate_limited(
        self, slot: Slot, retry_after_s: float | None, limits: ServerLimits | None
    ) -> None:
        now = self._clock()
        self._limited_since_progress += 1
        self._recent.append(True)
        if limits is not None:
            self._read_headers(limits)
        if self.adaptive and self.discovery.record(
            now, slot.epoch, limited=True, pacing=self._equivalent_rps
        ):
            self._apply()
        if retry_after_s:
            pause = self._everyone_waits(now, retry_after_s)
            if pause:
                self.pacer.pause_until(now + pause)

    def _everyone_waits(self, now: float, retry_after_s: float) -> float:
        """How long a 429 holds every request: its Retry-After when it speaks for everyone,
        at most ``SUSPECTED_PAUSE_S`` when congestion is only suspected, else nothing."""
        if not self.adaptive:
            return retry_after_s  # adaptive: false keeps the plain rule: every 429 pauses all
        refused, answers = sum(self._recent), len(self._recent)
        if answers >= 10 and refused > answers / 2:
            return retry_after_s  # the server refuses nearly everything: a wall, not noise
        if self.discovery.trial_running:
            # The cut is the answer to what was suspected; pausing too would slow the trial
            # and, were the 429s noise, the run. Only a plainly too shallow cut pauses.
            suspected = self.discovery.refused_in_trial()
        else:
            suspected = self.discovery.suspicious(refused, answers) or self.discovery.suspects(now)
        # A long Retry-After on a suspicion would idle a server that refills continuously;
        # the 429's own request still waits all of it.
        return min(retry_after_s, SUSPECTED_PAUSE_S) if suspected else 0.0

    def _progressed(self, limits: ServerLimits | None) -> None:
        self._last_progress = self._clock()
        self._limited_since_progress = 0
        if limits is not None:
            self._read_headers(limits)

    def _read_headers(self, limits: ServerLimits) -> None:
        if not self.adaptive:
            return  # adaptive: false paces at the job's limits exactly
        key = tuple((name, budget.per_minute) for name, budget in limits.budgets.items())
        if key != self._header_key:
            self._header_key = key
            self.header_style = limits.style
            # A little under the stated limit: an unpaced start (before any header was seen)
            # may have emptied the server's bucket, and replies arrive bunched.
            self.headers = {name: per_minute / 60 * HEADER_SHARE for name, per_minute in key}
            self._apply()
            # 429s to requests sent before the server's limit was known say nothing of it.
            self.discovery.forget_recent()
        requests = limits.budgets.get("requests")
        if requests is not None and requests.remaining is not None and requests.remaining < 1:
            wait = 60 / requests.per_minute
            if requests.reset_s is not None:
                wait = min(wait, requests.reset_s)
            self.pacer.pause_until(self._clock() + wait)

    # -- the run's side ---------------------------------------------------------------------

    @property
    def requests_per_s(self) -> float | None:
        """The request rate in force, or None when requests are not paced."""
        found = self._in_force.get("requests")
        return found[0] if found is not None else None

    def tick(self) -> None:
        """Once a second: grow the discovered rate, size concurrency, note what binds."""
        now = self._clock()
        elapsed, self._last_tick = now - self._last_tick, now
        pace_binds = self.pacer.waits > self._last_pacer_waits
        saturated = self._gate_waits > self._last_gate_waits
        self._last_pacer_waits, self._last_gate_waits = self.pacer.waits, self._gate_waits
        if self.adaptive:
            self.discovery.grow(now, elapsed, pace_binds=pace_binds)
            stated = [
                rates["requests"] for rates in (self.job, self.headers) if "requests" in rates
            ]
            ceiling = min(stated, default=None)
            found = self.discovery.rate_rps
            if found is not None and ceiling is not None and found >= ceiling:
                self.discovery.release()
            self._apply()
        limit = self.sizer.size(self._equivalent_rps(), saturated=saturated)
        if limit != self._gate.total_tokens:
            self._gate.total_tokens = limit
        bound = self.bound()
        if bound is not None:
            self.bound_seconds[bound] = self.bound_seconds.get(bound, 0.0) + elapsed

    def stalled(self) -> bool:
        """Nothing but 429s for ``stall_timeout_s``."""
        quiet = self._clock() - self._last_progress
        return self._limited_since_progress > 0 and quiet >= self.stall_timeout_s

    def bound(self) -> str | None:
        """What holds requests back now: rate, server, concurrency or memory."""
        if self._clock() < self.pacer.paused_until:
            return "server"
        if self.pacer.waiting:
            return "rate" if self._binding_source() == "job" else "server"
        if self._gate.available_tokens <= 0:  # every place in flight is taken
            held = self.sizer.held_by if self.sizer.auto else "cap"
            if held == "rate":
                return "rate" if self._binding_source() == "job" else "server"
            return {"cap": "concurrency", "memory": "memory"}.get(held or "", "server")
        return None

    def status(self) -> FlowStatus:
        rps = self._equivalent_rps()
        return FlowStatus(
            requests_per_minute=rps * 60 if rps is not None else None,
            source=self._binding_source(),
            in_flight=self.in_flight,
            concurrency=int(self._gate.total_tokens),
            bound=self.bound(),
        )

    def report(self) -> FlowReport:
        found = self.discovery.rate_rps
        lowest = self.discovery.lowest_rps
        return FlowReport(
            job={b: r * 60 for b, r in self.job.items()},
            headers={b: r * 60 / HEADER_SHARE for b, r in self.headers.items()},
            header_style=self.header_style,
            discovered_rpm=found * 60 if found is not None else None,
            lowest_discovered_rpm=lowest * 60 if lowest is not None else None,
            cuts=self.discovery.cuts,
            noise_share=self.discovery.noise_share,
            bound_seconds=dict(self.bound_seconds),
            concurrency=int(self._gate.total_tokens),
            concurrency_cap=self.sizer.cap,
            concurrency_auto=self.sizer.auto,
        )

    # -- the rates in force -----------------------------------------------------------------

    def _apply(self) -> None:
        """Pace every budget at the lowest rate known for it."""
        in_force: dict[str, tuple[float, str]] = {}
        for source, rates in (("job", self.job), ("headers", self.headers)):
            for budget, rate in rates.items():
                if budget not in in_force or rate < in_force[budget][0]:
                    in_force[budget] = (rate, source)
        found = self.discovery.rate_rps if self.adaptive else None
        if found is not None and ("requests" not in in_force or found < in_force["requests"][0]):
            in_force["requests"] = (found, "discovered")
        self._in_force = in_force
        for budget in BUDGETS:
            found_rate = in_force.get(budget)
            self.pacer.set_rate(budget, found_rate[0] if found_rate is not None else None)

    def _equivalent_rps(self) -> float | None:
        """The request rate the tightest budget allows, with the mean cost of a request."""
        rates = [
            rate / max(self._mean_cost.get(budget, 1.0), 1e-9) if budget != "requests" else rate
            for budget, (rate, _) in self._in_force.items()
            if budget == "requests" or budget in self._mean_cost
        ]
        return min(rates, default=None)

    def _binding_source(self) -> str | None:
        best: tuple[float, str] | None = None
        for budget, (rate, source) in self._in_force.items():
            rps = rate if budget == "requests" else rate / max(self._mean_cost.get(budget, 1), 1e-9)
            if best is None or rps < best[0]:
                best = (rps, source)
        return best[1] if best is not None else None
