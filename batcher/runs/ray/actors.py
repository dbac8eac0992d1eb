"""The two kinds of Ray actor of a cluster run: the shared budget and the shard workers.

Imported only by ``batcher run --ray``: nothing else of batcher imports Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import ray

from batcher.config import LimitsConfig
from batcher.flow.controller import FlowReport
from batcher.flow.limiter import Cost
from batcher.runs.ray import storage
from batcher.runs.ray.allowance import CostLedger
from batcher.runs.ray.lease import SAVE_EVERY_S, Answer, Grant, PaceState, SharedPace
from batcher.runs.ray.secrets import WorkerSecrets
from batcher.runs.ray.shard import Interruption, ShardResult, ShardTask, run_shard


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class LimitsActor:
    """The job's one budget: its pace (``lease.py``) and its dollar cap (``allowance.py``).
    Every call answers at once. Its state is saved at ``state_location`` about once a second,
    and whenever dollars are leased or given back; restarted, it takes up from there.
    ``secrets``: the credentials of the object store its state may be in."""

    def __init__(
        self,
        limits: LimitsConfig,
        state_location: str,
        run_id: str,
        secrets: WorkerSecrets,
        spent_usd: float = 0.0,
    ) -> None:
        secrets.install()
        self.budget = SharedPace(limits)
        # The cap is the job's: what its earlier runs spent (``spent_usd``) is spent already.
        self.ledger = CostLedger(limits.max_cost_usd, committed_usd=spent_usd)
        self.state_location = state_location
        self.run_id = run_id
        saved = storage.read_bytes(state_location)
        data = orjson.loads(saved) if saved is not None else {}
        # Only a restart within the same run takes up the state: a new run learns afresh
        # (its dollars start from what the job's checkpoint says was spent).
        if data.get("run") == run_id:
            self.budget.restore(PaceState.of_json(data))
            if "dollars" in data:
                self.ledger.restore(data["dollars"])
        self._saved_at = 0.0

    def lease(self, costs: Sequence[Cost], answers: Sequence[Answer]) -> Grant:
        grant = self.budget.lease(costs, answers)
        self._save()
        return grant

    def report(self, answers: Sequence[Answer]) -> None:
        self.budget.report(answers)

    def lease_dollars(self, holder: str, least_usd: float, wanted_usd: float) -> float:
        granted = self.ledger.lease(holder, least_usd, wanted_usd)
        if granted:
            self._save(force=True)  # before the grant is answered: a restart never regrants it
        return granted

    def give_back(self, holder: str, spent_usd: float) -> None:
        self.ledger.give_back(holder, spent_usd)
        self._save(force=True)

    def describe(self) -> str:
        pace = self.budget.describe()
        cap = self.ledger.max_cost_usd
        if cap is None:
            return pace
        committed = self.ledger.committed_usd
        return f"{pace}; ${committed:.4f} spent or leased of limits.max_cost_usd={cap:g}"

    def flow_report(self) -> FlowReport:
        return self.budget.flow.report()

    def _save(self, *, force: bool = False) -> None:
        state = self.budget.state()
        if force or state.saved_at - self._saved_at >= SAVE_EVERY_S:
            self._saved_at = state.saved_at
            data = {"run": self.run_id, **state.as_json(), "dollars": self.ledger.as_json()}
            storage.write_bytes(self.state_location, orjson.dumps(data))


class ActorLeaseSource:
    """A shard's way to the budget actor (``lease.LeaseSource``)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def lease(self, costs: Sequence[Cost], answers: Sequence[Answer]) -> Grant:
        grant: Grant = await self.actor.lease.remote(list(costs), list(answers))
        return grant

    def report(self, answers: Sequence[Answer]) -> None:
        self.actor.report.remote(list(answers))


class ActorAllowanceSource:
    """A shard's way to the budget actor's dollars (``allowance.AllowanceSource``)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def lease(self, holder: str, least_usd: float, wanted_usd: float) -> float:
        granted: float = await self.actor.lease_dollars.remote(holder, least_usd, wanted_usd)
        return granted

    def give_back(self, holder: str, spent_usd: float) -> None:
        # Waited for: the shard's result reaches the driver after its allowance is free.
        ray.get(self.actor.give_back.remote(holder, spent_usd))


# Two calls at a time: ``interrupt`` reaches the worker while ``run`` is going on.
@ray.remote(num_cpus=1, max_restarts=0, max_concurrency=2)  # type: ignore[call-overload]
class ShardWorker:
    """Runs shards one after another, each with batcher's own engine; ``secrets``: the API
    key and cloud credentials, in the worker's environment before any shard runs."""

    def __init__(self, budget: Any, secrets: WorkerSecrets) -> None:
        secrets.install()
        self.source = ActorLeaseSource(budget)
        self.allowance = ActorAllowanceSource(budget)
        self.interruption = Interruption()

    def run(self, task: ShardTask) -> ShardResult:
        return run_shard(task, self.source, self.allowance, self.interruption)

    def interrupt(self, signal_name: str) -> None:
        """The driver was interrupted: the shard running winds down as on one machine (what
        is in flight finishes, its part and journal are kept), and none starts after it."""
        self.interruption.interrupt(signal_name)
