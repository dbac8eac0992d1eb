"""One dollar cap for many processes: the shared side leases allowances, shards spend them.

``limits.max_cost_usd`` is the job's, whatever the number of shards. The shared side
(``CostLedger``, kept by the budget actor) counts every dollar leased out, spent or still
held, and never leases past the cap. A shard's run (``LeasedBudget``) is a one-machine
``Budget`` whose cap is what it has leased so far: each attempt still holds its upper-bound
cost while in flight, and only when that would cross the allowance does the shard ask for more
(what it is short of, and enough for ``LEASE_AHEAD`` requests like it, while that is a small
share of what is left), so the hot path makes one call per lease, not per request. Refused
while attempts of its own are in flight, a shard waits for one to settle and asks again;
refused with none, it stops with the one-machine ``BudgetStop`` (and the driver runs it again
once the other shards, which may hold leases they will not spend, have ended). At its end a
shard gives back what it did not spend. The ledger starts with what the job spent before.

Spent plus held never exceeds the cap; what can go past it is only what the replies in flight
cost beyond their upper bounds (a prompt longer than its estimate), a run's in-flight worth at
most. A shard whose worker dies never gives its allowance back: it stays counted as spent,
which may stop a run early but never lets it spend more. Pure: the source is injected.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import anyio

from batcher.rows.request import RowRequest
from batcher.send.budget import Budget, BudgetStop
from batcher.send.tally import Tally

# A lease covers the request that asked and this many more like it: more is fewer calls to
# the budget actor; less leaves less of the cap idle in one shard when another is refused.
LEASE_AHEAD = 16
# And it takes at most this share of what is left (or the one request, if more): near the cap
# leases shrink, so when one shard is refused the others hold a small share of the rest idle,
# not LEASE_AHEAD requests' worth each (which a shard near its end gives back unspent).
LEASE_SHARE = 0.125


@dataclass(slots=True)
class CostLedger:
    """The job's cap and every dollar leased against it, by holder (a shard's run)."""

    max_cost_usd: float | None
    committed_usd: float = 0.0  # spent (by earlier runs too), or leased and not given back
    spent_usd: float = 0.0  # what holders that gave back said they spent
    leases: dict[str, float] = field(default_factory=dict)

    def lease(self, holder: str, least_usd: float, wanted_usd: float) -> float:
        """Up to ``wanted_usd`` more for ``holder``, at least ``least_usd``, no more than
        ``LEASE_SHARE`` of what is left unless ``least_usd`` is; nothing if that crosses the cap."""
        if self.max_cost_usd is None:
            return wanted_usd
        free = self.max_cost_usd - self.committed_usd
        if least_usd > free:
            return 0.0
        granted = min(wanted_usd, max(least_usd, free * LEASE_SHARE))
        self.committed_usd += granted
        self.leases[holder] = self.leases.get(holder, 0.0) + granted
        return granted

    def give_back(self, holder: str, spent_usd: float) -> None:
        """``holder`` is done, having spent ``spent_usd``: the rest of its lease is free."""
        leased = self.leases.pop(holder, None)
        if leased is None:
            return  # given back already (a retried call)
        self.committed_usd += spent_usd - leased
        self.spent_usd += spent_usd

    def as_json(self) -> dict[str, Any]:
        return {
            "committed_usd": self.committed_usd,
            "spent_usd": self.spent_usd,
            "leases": self.leases,
        }

    def restore(self, data: dict[str, Any]) -> None:
        self.committed_usd = float(data["committed_usd"])
        self.spent_usd = float(data["spent_usd"])
        self.leases = {str(k): float(v) for k, v in data["leases"].items()}


class AllowanceSource(Protocol):
    """Where a shard's allowance comes from (the budget actor, or a ledger itself)."""

    async def lease(self, holder: str, least_usd: float, wanted_usd: float) -> float: ...

    def give_back(self, holder: str, spent_usd: float) -> None: ...


class LeasedBudget:
    """A shard's dollar budget (``CostBudget``): a one-machine ``Budget`` whose cap is the
    allowance leased so far from the job's."""

    def __init__(
        self, local: Budget, source: AllowanceSource, holder: str, *, ahead: int = LEASE_AHEAD
    ) -> None:
        self.local = local
        self.tally: Tally = local.tally
        self.source = source
        self.holder = holder
        self.ahead = ahead
        self.capped = local.max_cost_usd is not None
        if self.capped:
            local.max_cost_usd = 0.0  # nothing leased yet
            # What the job spent before this run is the ledger's to count (its cap starts
            # with it spent), not each shard's again from its own journal.
            local.spent_before_usd = 0.0
        self._asking = anyio.Lock()
        self.refused = False  # the job's cap is spent: this run stops, as on one machine
        self.refused_short_usd = 0.0  # what it was short of when last refused

    @property
    def allowance_usd(self) -> float:
        return self.local.max_cost_usd or 0.0

    def hold(self, request: RowRequest) -> AbstractAsyncContextManager[None]:
        if not self.capped:
            return self.local.hold(request)
        return _LeasedHold(self, request)

    def settle(self, cost_usd: float | None) -> None:
        self.local.settle(cost_usd)

    def worst_case_usd(self, request: RowRequest) -> float:
        return self.local.worst_case_usd(request)

    def give_back(self) -> None:
        """The run is over: what it leased and did not spend goes back to the job's cap."""
        if self.capped:
            self.source.give_back(self.holder, self.tally.cost_usd)

    def _short_usd(self, held: float) -> float:
        tally = self.tally
        return tally.cost_usd + tally.inflight_cost_usd + held - self.allowance_usd

    async def cover(self, request: RowRequest) -> None:
        """Lease what holding ``request`` needs beyond the allowance, if anything; one
        request asks at a time, and those behind it find it covered or ask for themselves."""
        held = self.local.estimate(request)
        if self.refused or self._short_usd(held) <= 0:
            return
        async with self._asking:
            short = self._short_usd(held)
            if short > 0 and not self.refused:
                granted = await self.source.lease(self.holder, short, short + held * self.ahead)
                self.local.max_cost_usd = self.allowance_usd + granted
                # Those queued behind ask no more: the refusal stops this run's dispatch.
                self.refused = not granted
                self.refused_short_usd = short

    def may_ask_again(self, request: RowRequest) -> bool:
        """After a refusal: whether attempts of this run settled since (while it asked, or
        in flight now, to be waited for), so it may be short of less than it was refused."""
        short = self._short_usd(self.local.estimate(request))
        return bool(self.local.holding) or short < self.refused_short_usd


class _LeasedHold:
    """``async with``: the allowance covered, then the local hold (which refuses, raising
    ``BudgetStop``, when the job's cap left too little to cover it)."""

    __slots__ = ("budget", "held", "request")

    def __init__(self, budget: LeasedBudget, request: RowRequest) -> None:
        self.budget, self.request = budget, request
        self.held: AbstractContextManager[None] | None = None

    async def __aenter__(self) -> None:
        budget, local = self.budget, self.budget.local
        while True:
            await budget.cover(self.request)
            try:
                held = local.reserve(self.request)
            except BudgetStop:
                if not budget.may_ask_again(self.request):
                    raise
                # This run's attempts in flight hold worst cases they will not all spend:
                # once one settles, ask again; refused with none in flight, the run stops.
                budget.refused = False
                if local.holding:
                    await local.released()
                continue
            held.__enter__()
            self.held = held
            return

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.held is not None:
            self.held.__exit__(kind, exc, tb)
