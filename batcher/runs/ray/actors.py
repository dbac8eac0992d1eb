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
from batcher.runs.ray.lease import SAVE_EVERY_S, Answer, BudgetState, Grant, SharedBudget
from batcher.runs.ray.shard import ShardResult, ShardTask, run_shard


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class BudgetActor:
    """The job's one budget. Every call answers at once (see ``lease.py``). Its state is saved
    at ``state_location`` about once a second; restarted, it takes up from there."""

    def __init__(self, limits: LimitsConfig, state_location: str, run_id: str) -> None:
        self.budget = SharedBudget(limits)
        self.state_location = state_location
        self.run_id = run_id
        saved = storage.read_bytes(state_location)
        data = orjson.loads(saved) if saved is not None else {}
        # Only a restart within the same run takes up the state: a new run learns afresh.
        if data.get("run") == run_id:
            self.budget.restore(BudgetState.of_json(data))
        self._saved_at = 0.0

    def lease(self, costs: Sequence[Cost], answers: Sequence[Answer]) -> Grant:
        grant = self.budget.lease(costs, answers)
        self._save()
        return grant

    def report(self, answers: Sequence[Answer]) -> None:
        self.budget.report(answers)

    def describe(self) -> str:
        return self.budget.describe()

    def flow_report(self) -> FlowReport:
        return self.budget.flow.report()

    def _save(self) -> None:
        state = self.budget.state()
        if state.saved_at - self._saved_at >= SAVE_EVERY_S:
            self._saved_at = state.saved_at
            data = {"run": self.run_id, **state.as_json()}
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


@ray.remote(num_cpus=1, max_restarts=0)
class ShardWorker:
    """Runs shards one after another, each with batcher's own engine."""

    def __init__(self, budget: Any) -> None:
        self.source = ActorLeaseSource(budget)

    def run(self, task: ShardTask) -> ShardResult:
        return run_shard(task, self.source)
