"""limits.max_cost_usd: each attempt reserves its upper-bound cost before it is sent and
settles at its real cost, so requests in flight can never together cross the cap.

A run's workers see the cap through ``CostBudget``: one machine's run has its own
(``Budget``); under ``--ray`` each shard's run has one whose cap is what it leased from the
job's one budget (``runs/ray/allowance.py``), chosen by ``RunOptions.budget_factory``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    contextmanager,
    nullcontext,
)
from types import TracebackType
from typing import Protocol

from batcher.errors import BudgetReachedError
from batcher.rows.request import PROMPT_MARGIN, RowRequest
from batcher.send.prices import Price, PriceTable
from batcher.send.tally import Tally

_NOTHING_HELD = nullcontext()


class BudgetStop(Exception):  # noqa: N818 - a signal between worker and runner, not an error
    """Sending this request could cross limits.max_cost_usd; the row stays pending."""


def budget_reached(max_cost_usd: float, spent_usd: float) -> BudgetReachedError:
    """The run's error when the cap stopped it, in every mode: ``spent_usd`` is what the run
    spent."""
    return BudgetReachedError(
        f"the budget limits.max_cost_usd={max_cost_usd:g} would be crossed "
        f"(spent ${spent_usd:.4f}); raise it and run again to resume"
    )


def upper_cost(
    price: Price, request: RowRequest, max_completion: int, copies: int, choices: int
) -> float:
    """An upper bound of one request's cost: the prompt with the heuristic's margin, each of
    its ``choices`` at ``max_completion``. ``copies`` is the choices the row's estimate holds."""
    prompt = request.estimated_tokens - max_completion * copies
    return price.cost(math.ceil(max(prompt, 0) * PROMPT_MARGIN), max_completion * choices)


class CostBudget(Protocol):
    """What a run's workers ask of the dollar budget; ``tally`` counts the run's spending."""

    tally: Tally

    def hold(self, request: RowRequest) -> AbstractAsyncContextManager[None]:
        """Hold the request's upper-bound cost while it is in flight; raise BudgetStop if
        that could cross the cap."""

    def settle(self, cost_usd: float | None) -> None:
        """Count what a reply really cost (an unpriced one counts nothing)."""


class Budget:
    """The cap, what this run has spent (the tally's) and what attempts in flight hold."""

    def __init__(
        self,
        max_cost_usd: float | None,
        prices: PriceTable,
        tally: Tally,
        *,
        max_completion: int,
        copies: int,
        choices: int,
    ) -> None:
        self.max_cost_usd = max_cost_usd
        self.prices = prices
        self.tally = tally
        self.max_completion = max_completion
        self.copies = copies
        self.choices = choices

    def estimate(self, request: RowRequest) -> float:
        price = self.prices.get(str(request.body.get("model")))
        if self.max_cost_usd is None or price is None:
            return 0.0
        return upper_cost(price, request, self.max_completion, self.copies, self.choices)

    def reserve(self, request: RowRequest) -> AbstractContextManager[None]:
        """Hold the request's upper-bound cost while it is in flight; raise BudgetStop if
        that could cross the cap. Without a cap there is nothing to hold."""
        if self.max_cost_usd is None:
            return _NOTHING_HELD
        return self._hold(request)

    def hold(self, request: RowRequest) -> AbstractAsyncContextManager[None]:
        """``reserve`` for ``async with`` (``CostBudget``): nothing here waits."""
        if self.max_cost_usd is None:
            return _NOTHING_HELD
        return _Held(self.reserve(request))

    @contextmanager
    def _hold(self, request: RowRequest) -> Iterator[None]:
        held = self.estimate(request)
        tally = self.tally
        if (
            self.max_cost_usd is not None
            and tally.cost_usd + tally.inflight_cost_usd + held > self.max_cost_usd
        ):
            raise BudgetStop
        tally.inflight_cost_usd += held
        try:
            yield
        finally:
            tally.inflight_cost_usd -= held

    def settle(self, cost_usd: float | None) -> None:
        """Count what a reply really cost (an unpriced one counts nothing)."""
        self.tally.cost_usd += cost_usd or 0.0


def own_budget(budget: Budget) -> CostBudget:
    """``RunOptions.budget_factory`` of one machine: the run's cap is its own."""
    return budget


class _Held:
    """A synchronous hold entered with ``async with`` (a class: no async generator per
    request)."""

    __slots__ = ("held",)

    def __init__(self, held: AbstractContextManager[None]) -> None:
        self.held = held

    async def __aenter__(self) -> None:
        self.held.__enter__()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.held.__exit__(kind, exc, tb)
