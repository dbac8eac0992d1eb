"""The job's one dollar cap under ``--ray``: shards lease allowances, the ledger never leases
past the cap. No Ray: the shards' source is the ledger itself; nothing waits."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batcher.rows.request import RowRequest
from batcher.runs.ray.allowance import CostLedger, LeasedBudget
from batcher.send.budget import Budget, BudgetStop
from batcher.send.prices import Price, PriceTable
from batcher.send.tally import Tally

pytestmark = pytest.mark.anyio
# request()'s worst case: 61 prompt tokens (its body's 29 bytes and a request's 32) and 43
# completion (its max_tokens), at $0.125 a token.
UPPER_USD = 13.0


class LedgerSource:
    """The budget actor's calls, made on the ledger in this process (one checkpoint each, so
    other tasks run meanwhile as they would while a real call is under way)."""

    def __init__(self, ledger: CostLedger) -> None:
        self.ledger = ledger
        self.calls = 0

    async def lease(self, holder: str, least_usd: float, wanted_usd: float) -> float:
        self.calls += 1
        await anyio.lowlevel.checkpoint()
        return self.ledger.lease(holder, least_usd, wanted_usd)

    def give_back(self, holder: str, spent_usd: float) -> None:
        self.ledger.give_back(holder, spent_usd)


def shard_budget(source: LedgerSource, holder: str, cap: float | None = 1.0) -> LeasedBudget:
    prices = PriceTable({"m": Price(input=125_000, output=125_000)})  # $0.125 a token
    local = Budget(cap, prices, Tally())
    return LeasedBudget(local, source, holder)


def request() -> RowRequest:
    return RowRequest("k", {"model": "m", "max_tokens": 43}, b"f", 10)


async def spend_until_refused(
    budget: LeasedBudget, costs: list[float], ledger: CostLedger, workers: int
) -> int:
    """``workers`` tasks send requests costing ``costs`` in turn until the budget refuses;
    after every step, what is spent and held across shards is checked against the cap."""
    sent = 0
    cap = ledger.max_cost_usd or 0.0

    async def work(index: int) -> None:
        nonlocal sent
        step = index
        while True:
            try:
                async with budget.hold(request()):
                    assert ledger.committed_usd <= cap + 1e-9
                    await anyio.lowlevel.checkpoint()
                    budget.settle(costs[step % len(costs)])
            except BudgetStop:
                return
            sent += 1
            step += workers

    async with anyio.create_task_group() as group:
        for index in range(workers):
            group.start_soon(work, index)
    return sent


async def test_shards_together_spend_no_more_than_the_cap_in_few_calls() -> None:
    cap = 10_000.0
    ledger = CostLedger(cap)
    source = LedgerSource(ledger)
    shards = [shard_budget(source, f"shard-{i}") for i in range(3)]
    sent: list[int] = []

    async def run(budget: LeasedBudget) -> None:
        sent.append(await spend_until_refused(budget, [10.0, 13.0, 7.0], ledger, workers=8))

    async with anyio.create_task_group() as group:
        for budget in shards:
            group.start_soon(run, budget)
    spent = sum(b.tally.cost_usd for b in shards)
    assert all(count > 0 for count in sent)
    assert spent <= cap
    # Each stopped only when what it held and the ledger's rest could not cover a request.
    assert spent > cap - (len(shards) + 1) * UPPER_USD
    assert all(b.tally.inflight_cost_usd == 0 for b in shards)
    # One call covers a request and LEASE_AHEAD more, not one call a request.
    assert source.calls <= sum(sent) / 8
    for budget in shards:
        budget.give_back()
    assert ledger.committed_usd == pytest.approx(spent)
    assert ledger.spent_usd == pytest.approx(spent)
    assert ledger.leases == {}


async def test_what_one_shard_gives_back_another_may_spend_and_a_dead_one_keeps() -> None:
    ledger = CostLedger(20.0)  # room for one request at its upper bound, $13
    source = LedgerSource(ledger)
    first, refused, later, last = (shard_budget(source, f"s{i}") for i in range(4))
    async with first.hold(request()):
        first.settle(5.0)
    assert ledger.committed_usd == 13.0
    with pytest.raises(BudgetStop):
        async with refused.hold(request()):
            pass
    calls = source.calls
    with pytest.raises(BudgetStop):  # refused once, a run stops: it does not ask again
        async with refused.hold(request()):
            pass
    assert source.calls == calls
    first.give_back()  # spent 5: the other 8 are free again
    assert ledger.committed_usd == 5.0
    async with later.hold(request()):
        later.settle(1.0)
    # Were the later shard's worker dead, it would never give back: its lease stays counted.
    assert ledger.committed_usd == 18.0
    with pytest.raises(BudgetStop):
        async with last.hold(request()):
            pass
    # The ledger survives a restart of the actor that keeps it.
    restored = CostLedger(20.0)
    restored.restore(ledger.as_json())
    assert restored == ledger
    later.give_back()
    later.give_back()  # a retried call gives back once
    assert ledger.committed_usd == pytest.approx(6.0)
    assert ledger.spent_usd == pytest.approx(6.0)


def test_leases_shrink_as_the_cap_nears() -> None:
    """A lease is what was asked while that is a small share of what is left, then that
    share, then just what the one request needs."""
    ledger = CostLedger(10_000.0)
    assert ledger.lease("a", 13.0, 221.0) == 221.0
    ledger = CostLedger(1_000.0)
    assert ledger.lease("a", 13.0, 221.0) == 125.0  # an eighth of the 1,000 left
    assert ledger.lease("b", 13.0, 221.0) == pytest.approx(875 / 8)
    ledger = CostLedger(50.0)
    assert ledger.lease("a", 13.0, 221.0) == 13.0
    assert ledger.lease("b", 13.0, 221.0) == 13.0
    assert ledger.lease("c", 13.0, 221.0) == 13.0
    assert ledger.lease("d", 13.0, 221.0) == 0.0  # 11 left: not enough for one request
    assert ledger.committed_usd == 39.0
    assert ledger.leases == {"a": 13.0, "b": 13.0, "c": 13.0}


async def test_no_cap_leases_nothing() -> None:
    source = LedgerSource(CostLedger(None))
    budget = shard_budget(source, "free", cap=None)
    async with budget.hold(request()):
        budget.settle(1e9)
    budget.give_back()
    assert source.calls == 0
    assert budget.tally.inflight_cost_usd == 0


@settings(max_examples=50, deadline=None)
@given(
    cap=st.floats(min_value=0.0, max_value=500.0),
    costs=st.lists(st.floats(min_value=0.5, max_value=UPPER_USD), min_size=1, max_size=20),
    shards=st.integers(min_value=1, max_value=4),
    workers=st.integers(min_value=1, max_value=6),
)
def test_the_cap_holds_for_any_costs_and_shards(
    cap: float, costs: list[float], shards: int, workers: int
) -> None:
    """Replies cost at most their upper bound: then spent plus held never crosses the cap,
    whatever the shards, their concurrency and the costs."""
    ledger = CostLedger(cap)
    source = LedgerSource(ledger)
    budgets = [shard_budget(source, f"s{i}") for i in range(shards)]

    async def main() -> None:
        async with anyio.create_task_group() as group:
            for budget in budgets:
                group.start_soon(spend_until_refused, budget, costs, ledger, workers)

    anyio.run(main)
    assert sum(b.tally.cost_usd for b in budgets) <= cap + 1e-9
    assert ledger.committed_usd <= cap + 1e-9


@pytest.mark.parametrize("workers", [1, 2, 8])
async def test_a_shard_refused_with_attempts_in_flight_waits_for_them(workers: int) -> None:
    """Replies cost a third of what their attempts held: a shard refused while attempts of
    its own are in flight waits for them to settle and asks again, so it stops only once
    the job's cap has no room for one more request's worst case."""
    ledger = CostLedger(100.0)
    budget = shard_budget(LedgerSource(ledger), "s", cap=100.0)
    sent = await spend_until_refused(budget, [UPPER_USD / 3], ledger, workers)
    spent = budget.tally.cost_usd
    assert sent == 21  # 20 at $4.33 leave $13.33: room for one more at its worst case
    assert 100.0 - UPPER_USD < spent <= 100.0
