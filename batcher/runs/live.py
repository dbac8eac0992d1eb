"""Dispatching a live run: the producer reads and prepares rows, a fixed pool of workers sends
them, each outcome goes to the journal, and a clock ticks the flow controller once a second."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from batcher.errors import (
    AccountError,
    BatcherError,
    BudgetReachedError,
    KeyRefusedError,
    RateLimitStallError,
)
from batcher.flow.controller import FlowController, Halted
from batcher.rows.plan import Plan, Prepared, RowFailure, Unchanged
from batcher.rows.request import RowRequest
from batcher.runs.progress import Progress
from batcher.runs.stopping import Stopping
from batcher.send.budget import BudgetStop
from batcher.send.client import ChatClient
from batcher.send.parse import OutputParser
from batcher.send.prices import PriceTable
from batcher.send.sender import Sender
from batcher.send.tally import Tally
from batcher.send.worker import RowWorker
from batcher.store.columns import Outcome
from batcher.store.journal import Journal, Previous


class Dispatch:
    """Sends a run's pending rows; ``flow`` is kept for the summary."""

    def __init__(
        self,
        plan: Plan,
        journal: Journal,
        stopping: Stopping,
        tally: Tally,
        *,
        parser: OutputParser,
        prices: PriceTable,
        positions: frozenset[int] | None,
        skip_failed: bool,
        flow: FlowController,
    ) -> None:
        self.plan = plan
        self.journal = journal
        self.stopping = stopping
        self.tally = tally
        self.parser = parser
        self.prices = prices
        self.positions = positions
        self.skip_failed = skip_failed
        self.flow = flow

    async def run(self, base_url: str, progress: Progress) -> None:
        config, plan, flow = self.plan.job.config, self.plan, self.flow
        concurrency = config.limits.connections
        endpoint = config.endpoint.model_copy(update={"base_url": base_url})
        async with ChatClient(endpoint, plan.api_key, concurrency) as client:
            sender = Sender.for_job(config, plan.builder, client, flow, plan.images, self.tally)
            worker = RowWorker.for_job(
                config, plan.builder, sender, self.parser, self.prices, self.tally
            )
            worker.interrupted = self._record_interrupted
            self.stopping.attach(flow, self.tally)
            send, receive = anyio.create_memory_object_stream[RowRequest](concurrency)
            async with anyio.create_task_group() as clock:
                clock.start_soon(self._tick, progress)
                with self.stopping.work_scope:
                    async with anyio.create_task_group() as workers:
                        workers.start_soon(self._produce, send, progress)
                        for _ in range(concurrency):
                            workers.start_soon(self._work, receive.clone(), worker, progress)
                        receive.close()
                clock.cancel_scope.cancel()  # the clock stops with the workers

    async def _produce(self, send: ObjectSendStream[RowRequest], progress: Progress) -> None:
        positions = self.positions
        position = 0
        batches = self.plan.batches()
        with self.stopping.dispatch_scope:
            async with send:
                try:
                    while True:
                        prepared = await anyio.to_thread.run_sync(self._next_batch, batches)
                        if prepared is None:
                            return
                        for _, item, previous in prepared:
                            position += 1
                            if positions is not None and position - 1 not in positions:
                                continue
                            if self._done(item, previous):
                                self.tally.skipped += 1
                                progress.advance()
                                continue
                            if isinstance(item, RowFailure):
                                self.journal.record(item.outcome())
                                self.tally.failed += 1
                                self.tally.errors[f"final:{item.kind}"] += 1
                                progress.advance()
                                continue
                            if isinstance(item, RowRequest):  # always, by now
                                await send.send(item)
                except BatcherError as exc:
                    self.stopping.stop_dispatch(exc)

    def _done(self, item: Prepared, previous: Previous | None) -> bool:
        """Whether the journal's outcome stands for this row as it is now."""
        return isinstance(item, Unchanged) or (
            previous is not None
            and previous.fingerprint == item.fingerprint
            and previous.stands(self.skip_failed)
        )

    def _next_batch(
        self, batches: Iterator[Any]
    ) -> list[tuple[Any, Prepared, Previous | None]] | None:
        """Read, look up and prepare one batch (blocking: runs in a worker thread)."""
        batch = next(batches, None)
        if batch is None:
            return None
        skip_failed = self.skip_failed
        return self.plan.prepare(batch, self.journal.done, lambda p: p.stands(skip_failed))

    async def _work(
        self, receive: ObjectReceiveStream[RowRequest], worker: RowWorker, progress: Progress
    ) -> None:
        stopping = self.stopping
        async with receive:
            async for request in receive:
                if stopping.stopping:
                    continue  # dispatch stopped: leave the rest pending for the next run
                try:
                    outcome = await worker.process(request)
                except Halted:
                    continue  # stopped before it was sent: pending for the next run
                except BudgetStop:
                    cap = self.plan.job.config.limits.max_cost_usd
                    stopping.stop_dispatch(
                        BudgetReachedError(
                            f"the budget limits.max_cost_usd={cap:g} would be crossed "
                            f"(spent ${self.tally.cost_usd:.4f}); raise it and run again to resume"
                        )
                    )
                    continue
                except (KeyRefusedError, AccountError) as exc:
                    stopping.stop_work(exc)
                    return
                try:
                    self.journal.record(outcome)
                except BatcherError as exc:
                    stopping.stop_work(exc)
                    return
                progress.advance()

    def _record_interrupted(self, outcome: Outcome) -> None:
        """A row stopped mid-way with replies paid for: its outcome carries their cost."""
        try:
            self.journal.record(outcome)
        except BatcherError as exc:
            self.stopping.stop_work(exc)

    async def _tick(self, progress: Progress) -> None:
        """Once a second: the flow controller's clockwork, status lines, the stall check."""
        flow = self.flow
        while True:
            await anyio.sleep(1.0)
            flow.tick()
            progress.tick()
            if flow.stalled() and not self.stopping.stopping:
                self.stopping.wind_down(
                    RateLimitStallError(
                        "the server answered nothing but 429 (rate limited) for "
                        f"limits.stall_timeout_s={flow.stall_timeout_s:g} s"
                    )
                )
