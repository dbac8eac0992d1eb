"""limits.max_cost_usd, the job's: each attempt reserves its worst case before it is sent and
settles at its real cost, so what the job spent over all its runs and what requests in flight
hold can never together cross the cap.

A run starts from what its checkpoint says the job spent (``spent_before_usd``). An attempt
whose worst case (``send/bound.py``) does not fit beside those in flight waits for them to
settle; one that does not fit with nothing in flight stops the run (``BudgetStop``).

A run's workers see the cap through ``CostBudget``: one machine's run has its own
(``Budget``); under ``--ray`` each shard's run has one whose cap is what it leased from the
job's one budget (``runs/ray/allowance.py``), chosen by ``RunOptions.budget_factory``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    contextmanager,
    nullcontext,
)
from types import TracebackType
from typing import Protocol

import anyio

from batcher.errors import BudgetReachedError
from batcher.rows.request import RowRequest
from batcher.send.bound import request_bound
from batcher.send.prices import Price, PriceTable
from batcher.send.tally import Tally

_NOTHING_HELD = nullcontext()


class BudgetStop(Exception):  # noqa: N818 - a signal between worker and runner, not an error
    """Sending this request could cross limits.max_cost_usd; the row stays pending.
    ``error`` is the run's reason, worded by the budget that knows the job's spend."""

    def __init__(self, error: BudgetReachedError) -> None:
        super().__init__(str(error))
        self.error = error


def budget_reached(
    max_cost_usd: float,
    spent_usd: float,
    *,
    request_usd: float | None = None,
    output_limited: bool = True,
) -> BudgetReachedError:
    """The run's error when the cap stopped it, in every mode: ``spent_usd`` is what the job
    spent over all its runs; ``request_usd`` the worst case of the request that did not fit
    (None: not known)."""
    left = max_cost_usd - spent_usd
    message = f"the job has spent ${spent_usd:.4f} of its limits.max_cost_usd={max_cost_usd:g}"
    if request_usd is not None and request_usd > left > 0:
        message += (
            f", and the next request may cost up to ${request_usd:.4f} (its worst case), more "
            f"than the ${left:.4f} left"
        )
    message += "; raise limits.max_cost_usd to go on"
    if request_usd is not None and not output_limited:
        message += (
            ", or set request.max_tokens (unset, each request is reserved the model's "
            "longest output)"
        )
    return BudgetReachedError(message, request_usd=request_usd, output_limited=output_limited)


def upper_cost(price: Price, request: RowRequest) -> float:
    """An upper bound of one request's cost at ``price``: its worst case, no cache read."""
    return request_bound(request, price).cost(price)


class CostBudget(Protocol):
    """What a run's workers ask of the dollar budget; ``tally`` counts the run's spending."""

    tally: Tally

    def hold(self, request: RowRequest) -> AbstractAsyncContextManager[None]:
        """Hold the request's upper-bound cost while it is in flight; raise BudgetStop if
        that could cross the cap."""

    def settle(self, cost_usd: float | None) -> None:
        """Count what a reply really cost (an unpriced one counts nothing)."""

    def worst_case_usd(self, request: RowRequest) -> float:
        """What ``request`` costs at most, cap or not: a reply without usage is charged it."""


class Budget:
    """The cap, what the job spent before this run, what this run has spent (the tally's)
    and what attempts in flight hold."""

    def __init__(
        self,
        max_cost_usd: float | None,
        prices: PriceTable,
        tally: Tally,
        *,
        spent_before_usd: float = 0.0,
    ) -> None:
        self.max_cost_usd = max_cost_usd
        self.prices = prices
        self.tally = tally
        self.spent_before_usd = spent_before_usd
        self._holding = 0  # attempts in flight with a hold
        self._released: anyio.Event | None = None  # set when one settles, for who waits

    def worst_case_usd(self, request: RowRequest) -> float:
        price = self.prices.get(str(request.body.get("model")))
        return 0.0 if price is None else upper_cost(price, request)

    def estimate(self, request: RowRequest) -> float:
        """What holding ``request`` holds: its worst case, nothing without a cap."""
        if self.max_cost_usd is None:
            return 0.0
        return self.worst_case_usd(request)

    @property
    def spent_usd(self) -> float:
        """What the job has spent: before this run and in it."""
        return self.spent_before_usd + self.tally.cost_usd

    def fits(self, held: float) -> bool:
        tally = self.tally
        cap = self.max_cost_usd
        return cap is None or self.spent_usd + tally.inflight_cost_usd + held <= cap

    def stop(self, request: RowRequest, held: float) -> BudgetStop:
        """The stop when ``request``, holding ``held``, does not fit."""
        price = self.prices.get(str(request.body.get("model")))
        limited = price is None or request_bound(request, price).output_limited
        cap = self.max_cost_usd or 0.0
        return BudgetStop(
            budget_reached(cap, self.spent_usd, request_usd=held, output_limited=limited)
        )

    def reserve(self, request: RowRequest) -> AbstractContextManager[None]:
        """Hold the request's upper-bound cost while it is in flight; raise BudgetStop at
        once if that could cross the cap. Without a cap there is nothing to hold."""
        if self.max_cost_usd is None:
            return _NOTHING_HELD
        held = self.estimate(request)
        if not self.fits(held):
            raise self.stop(request, held)
        return self._held(held)

    def hold(self, request: RowRequest) -> AbstractAsyncContextManager[None]:
        """``reserve`` for ``async with`` (``CostBudget``), which waits while attempts in
        flight hold what it needs: it stops the run only if it cannot fit beside none."""
        if self.max_cost_usd is None:
            return _NOTHING_HELD
        return _Waited(self, request)

    async def room(self, request: RowRequest) -> AbstractContextManager[None]:
        held = self.estimate(request)
        while not self.fits(held):
            if not self._holding:
                raise self.stop(request, held)
            await self.released()
        return self._held(held)

    @property
    def holding(self) -> int:
        """Attempts in flight with a hold."""
        return self._holding

    async def released(self) -> None:
        """Wait until an attempt in flight gives its hold back."""
        if self._released is None:
            self._released = anyio.Event()
        await self._released.wait()

    @contextmanager
    def _held(self, held: float) -> Iterator[None]:
        tally = self.tally
        tally.inflight_cost_usd += held
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            tally.inflight_cost_usd = max(tally.inflight_cost_usd - held, 0.0)
            if not self._holding:
                tally.inflight_cost_usd = 0.0  # no float dust left when none is held
            released, self._released = self._released, None
            if released is not None:
                released.set()

    def settle(self, cost_usd: float | None) -> None:
        """Count what a reply really cost (an unpriced one counts nothing; a cost is never
        negative, so no reply credits the budget)."""
        self.tally.cost_usd += max(cost_usd or 0.0, 0.0)


def own_budget(budget: Budget) -> CostBudget:
    """``RunOptions.budget_factory`` of one machine: the run's cap is its own."""
    return budget


class _Waited:
    """A hold entered with ``async with`` once there is room (a class: no async generator
    per request)."""

    __slots__ = ("budget", "held", "request")

    def __init__(self, budget: Budget, request: RowRequest) -> None:
        self.budget, self.request = budget, request
        self.held: AbstractContextManager[None] = _NOTHING_HELD

    async def __aenter__(self) -> None:
        self.held = await self.budget.room(self.request)
        self.held.__enter__()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.held.__exit__(kind, exc, tb)
