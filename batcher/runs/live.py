"""The live engine: the producer reads and prepares rows, a fixed pool of workers sends them,
each outcome goes to the journal, and a clock ticks the flow controller once a second."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from batcher.errors import (
    AccountError,
    BatcherError,
    KeyRefusedError,
    RateLimitStallError,
)
from batcher.flow.controller import FlowController, FlowReport, Halted
from batcher.rows.plan import Prepared, RowFailure, Unchanged
from batcher.rows.request import RowRequest
from batcher.runs.context import RunContext
from batcher.runs.progress import Progress
from batcher.runs.stopping import Interrupt
from batcher.send.budget import BudgetStop
from batcher.send.client import ChatClient
from batcher.send.sender import Sender
from batcher.send.tally import Tally
from batcher.send.worker import RowWorker
from batcher.store.columns import Outcome


class LiveEngine:
    """Sends a run's pending rows one request at a time, paced by its flow controller."""

    def __init__(self, flow: FlowController, grace_s: float) -> None:
        self.flow = flow
        self.grace_s = grace_s
        self._tally: Tally | None = None

    def interrupted(self, signal_name: str) -> Interrupt:
        grace = f"up to {self.grace_s:g} s to finish (interrupt again to skip)"
        return Interrupt(
            f"interrupted by {signal_name}",
            f"{signal_name}: stopping; nothing more is sent; {self.flow.in_flight:,} requests "
            f"in flight (of {self._sent():,} sent) have {grace}",
            self.grace_s,
        )

    def _sent(self) -> int:
        return self._tally.requests if self._tally is not None else 0

    def flow_report(self) -> FlowReport:
        return self.flow.report()

    async def send(self, context: RunContext) -> None:
        options = context.options
        self._tally = context.tally
        total = context.plan.total_rows if options.positions is None else len(options.positions)
        progress = Progress(
            context.tally,
            total,
            quiet=options.quiet,
            flow=self.flow,
            every_s=options.progress_every_s,
            clock=options.clock,
        )
        try:
            await Dispatch(context, self.flow, self.grace_s).run(progress)
        finally:
            progress.close()


class Dispatch:
    """One live run's sending: a producer, a pool of workers and a clock."""

    def __init__(self, context: RunContext, flow: FlowController, grace_s: float) -> None:
        self.plan = context.plan
        self.journal = context.journal
        self.stopping = context.stopping
        self.tally = context.tally
        self.parser = context.parser
        self.prices = context.prices
        self.positions = context.options.positions
        self.skip_failed = context.options.skip_failed
        self.budget_factory = context.options.budget_factory
        self.spent_before_usd = context.spent_before_usd
        self.base_url = context.base_url
        self.clock = context.options.clock
        self.transport = context.options.transport
        self.offload = context.options.offload
        self.first_rows = context.first_rows
        self.flow = flow
        self.grace_s = grace_s

    async def run(self, progress: Progress) -> None:
        config, plan, flow = self.plan.job.config, self.plan, self.flow
        concurrency = config.limits.connections
        endpoint = config.endpoint.model_copy(update={"base_url": self.base_url})
        now = self.clock
        client = ChatClient(endpoint, plan.api_key, concurrency, transport=self.transport)
        async with client:
            sender = Sender.for_job(
                config, plan.builder, client, flow, plan.images, self.tally, clock=now
            )
            worker = RowWorker.for_job(
                config,
                plan.builder,
                sender,
                self.parser,
                self.prices,
                self.tally,
                budget_factory=self.budget_factory,
                spent_before_usd=self.spent_before_usd,
                clock=now,
                secret=plan.api_key,
            )
            worker.interrupted = self._record_interrupted
            self.stopping.attach(flow)
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
                        prepared = await self.offload(lambda: self._next_batch(batches))
                        if prepared is None:
                            return
                        for _, item in prepared:
                            position += 1
                            if positions is not None and position - 1 not in positions:
                                continue
                            if isinstance(item, Unchanged):
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
                                await self.first_rows.admit()
                                await send.send(item)
                except BatcherError as exc:
                    self.stopping.stop_dispatch(exc)

    def _next_batch(self, batches: Iterator[Any]) -> list[tuple[Any, Prepared]] | None:
        """Read, look up and decide one batch (blocking: runs in a worker thread, or as the
        run's options say)."""
        batch = next(batches, None)
        if batch is None:
            return None
        return self.plan.decide(batch, self.journal.done, skip_failed=self.skip_failed)

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
                except BudgetStop as stop:
                    stopping.stop_dispatch(stop.error)
                    continue
                except (KeyRefusedError, AccountError) as exc:
                    # As for a signal: the answers the server is giving are paid for, kept.
                    stopping.wind_down(exc, self.grace_s)
                    continue
                try:
                    stored = self.journal.record(outcome)
                except BatcherError as exc:
                    stopping.stop_work(exc)
                    return
                if stored is not outcome:  # a value did not fit the journal: the row failed
                    self.tally.recount(outcome, stored)
                self.first_rows.settled(stored)
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
            stall = flow.stall()
            if stall is not None and not self.stopping.stopping:
                self.stopping.wind_down(RateLimitStallError(stall), self.grace_s)
