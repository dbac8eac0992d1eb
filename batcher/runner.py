"""A run: the producer reads and prepares rows, a fixed pool of workers sends them, the journal
keeps every outcome, and the output is rebuilt at the end, whatever the end was."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from batcher.batch import BatchRun
from batcher.client import ChatClient
from batcher.config import Job, LimitsConfig, load_job
from batcher.errors import (
    AccountError,
    BatcherError,
    BudgetReachedError,
    ConfigError,
    InterruptedRunError,
    KeyRefusedError,
    OutputError,
    RateLimitStallError,
)
from batcher.flow import FlowController
from batcher.journal import Journal, Previous, journal_path
from batcher.lock import RunLock
from batcher.parse import OutputParser
from batcher.plan import Plan, Prepared, RowFailure, Unchanged
from batcher.prices import PriceTable
from batcher.request import REASONING_MODELS, RowRequest
from batcher.sink import OutputLayout, Written, check_output_target, write_output
from batcher.summary import RunSummary
from batcher.tally import Progress, Tally
from batcher.worker import BudgetStop, Halted, RowWorker, failure_outcome

GRACE_S = 10.0
SIMULATOR_URL = "batcher-simulator"  # what --simulate runs fingerprint as, whatever the port


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class RunOptions:
    simulate: bool = False
    limit: int | None = None
    fresh: bool = False
    skip_failed: bool = False
    keep_done: bool = False  # keep rows answered before, whatever their request is now
    quiet: bool = False
    prices_path: str | None = None
    positions: frozenset[int] | None = None  # only these row positions (estimate --sample)
    resume_command: str | None = None
    grace_s: float = GRACE_S
    progress_every_s: float = 30.0  # status lines when stderr is not a terminal; 0: none
    cancel: bool = False  # batch mode: cancel the batches in flight instead of submitting
    notify: Callable[[str], None] = _stderr
    # Builds the run's flow controller (--ray: one whose pacing is leased from a shared budget).
    flow_factory: Callable[[LimitsConfig], FlowController] = FlowController


class Run:
    """One execution of a job; ``execute`` returns its summary."""

    def __init__(self, job: Job, options: RunOptions, plan: Plan) -> None:
        self.job = job
        self.options = options
        self.plan = plan
        config = job.config
        try:
            self.parser = OutputParser(config)
        except ConfigError as exc:
            raise ConfigError(f"{job.source}: {exc}") from None
        self.layout = OutputLayout(plan, self.parser.columns)
        clash = set(self.parser.columns) & set(self.layout.fixed_names())
        if clash:
            raise ConfigError(
                f"{job.source}: output schema properties {', '.join(sorted(clash))} clash with "
                "existing output columns; rename them or drop them from output.keep_columns"
            )
        self.prices = PriceTable.load(options.prices_path, config.prices)
        try:
            self.layout.check_input_columns()
            for model in config.request.models:
                self.prices.require_for_budget(model, config.limits.max_cost_usd)
        except ConfigError as exc:
            raise ConfigError(f"{job.source}: {exc}") from None
        self.tally = Tally()
        request = config.request
        for model in request.models if request.reasoning_effort not in (None, "none") else ():
            if model not in REASONING_MODELS:
                warning = f"model {model} is not listed as supporting reasoning_effort"
                self.tally.warnings[warning] += 1
                options.notify(f"warning: {warning}")
        self.abort: BatcherError | None = None
        self.flow: FlowController | None = None
        self.stopping = False
        self.writing = False  # the output is being written: signals only take note
        self._dispatch_scope = anyio.CancelScope()
        self._work_scope = anyio.CancelScope()

    def stop_dispatch(self, reason: BatcherError) -> None:
        if self.abort is None:
            self.abort = reason
        self.stopping = True
        self._dispatch_scope.cancel()

    async def execute(self, base_url: str) -> RunSummary:
        plan = self.plan
        started = time.monotonic()
        journal_file = journal_path(self.job.checkpoint_dir)
        check_output_target(self.job.source, plan.output_path)
        lock = RunLock(self.job.checkpoint_dir)
        try:
            identity, legacy = self._identity()
            if self.options.fresh and journal_file.exists():
                self.options.notify(f"--fresh: replacing the checkpoint {journal_file}")
            journal = await anyio.to_thread.run_sync(
                lambda: Journal(journal_file, identity, fresh=self.options.fresh, legacy=legacy)
            )
            # Signals are watched until the output is written: one arriving during the write
            # must neither kill the process nor raise a KeyboardInterrupt into it.
            error: BatcherError | None = None
            async with anyio.create_task_group() as watch:
                if threading.current_thread() is threading.main_thread():
                    watch.start_soon(self._watch_signals)
                try:
                    written = await self._dispatch_and_write(journal, base_url)
                except BatcherError as exc:
                    error = exc  # raised below, outside the task group's exception group
                finally:
                    watch.cancel_scope.cancel()
        finally:
            lock.release()
        if error is not None:
            raise error
        return self._summary(written, started)

    async def _dispatch_and_write(self, journal: Journal, base_url: str) -> Written:
        try:
            await self._dispatch(journal, base_url)
        finally:
            failure = await anyio.to_thread.run_sync(journal.close)
        if failure is not None:
            self.stop_dispatch(failure)
        self.writing = True
        written = await self._write(journal.path)
        if written.stopped is not None and self.abort is None:
            self.abort = written.stopped  # the input broke at a row: what is before it stands
        return written

    def _identity(self) -> tuple[dict[str, str], dict[str, str]]:
        """The checkpoint's identity, its paths relative to the job file so a moved project
        folder keeps its checkpoint; and the absolute spelling older checkpoints stored."""
        folder = self.job.source.parent
        output = self.job.output_path
        identity = {
            "input": os.path.relpath(self.job.input_path, folder),
            "output": os.path.relpath(output, folder),
            "key_column": self.plan.source.key_column,
        }
        return identity, {"input": self.job.input_path, "output": str(output)}

    async def _dispatch(self, journal: Journal, base_url: str) -> None:
        config = self.job.config
        plan = self.plan
        self.flow = flow = self.options.flow_factory(config.limits)
        total = plan.total_rows if self.options.positions is None else len(self.options.positions)
        progress = Progress(
            self.tally,
            total,
            quiet=self.options.quiet,
            flow=flow,
            every_s=self.options.progress_every_s,
        )
        concurrency = config.limits.connections
        endpoint = config.endpoint.model_copy(update={"base_url": base_url})
        try:
            async with ChatClient(endpoint, plan.api_key, concurrency) as client:
                worker = RowWorker(
                    config,
                    client,
                    flow,
                    plan.images,
                    self.parser,
                    self.prices,
                    self.tally,
                    requests_per_row=plan.builder.requests_per_row,
                )
                worker.halted = lambda: self.stopping
                send, receive = anyio.create_memory_object_stream[RowRequest](concurrency)
                async with anyio.create_task_group() as clock:
                    clock.start_soon(self._tick, flow, progress)
                    with self._work_scope:
                        async with anyio.create_task_group() as workers:
                            workers.start_soon(self._produce, send, journal, progress)
                            for _ in range(concurrency):
                                workers.start_soon(
                                    self._work, receive.clone(), worker, journal, progress
                                )
                            receive.close()
                    clock.cancel_scope.cancel()  # the clock stops with the workers
        finally:
            progress.close()

    async def _write(self, journal_file: Path) -> Written:
        """Rebuild the output; if that fails, say so in one line with how to rebuild it."""
        plan, layout = self.plan, self.layout
        try:
            return await anyio.to_thread.run_sync(lambda: write_output(plan, layout, journal_file))
        except OutputError as exc:
            resume = self.options.resume_command or f"batcher run {self.job.source}"
            reason = f"{self.abort}; then " if self.abort is not None else ""
            raise OutputError(
                f"{reason}{exc}; every answer is kept in the checkpoint: fix that and run "
                f"`{resume}` to rebuild the output (rows already answered are not sent again)"
            ) from None

    def _summary(self, written: Written, started: float) -> RunSummary:
        return RunSummary.of_run(
            self.tally,
            output_path=self.plan.output_path,
            rows_total=self.plan.total_rows,
            rows_ok=written.ok,
            rows_failed=written.failed,
            output_cost_usd=written.cost_usd,
            started=started,
            aborted=self.abort,
            resume_command=self.options.resume_command or f"batcher run {self.job.source}",
            flow=self.flow.report() if self.flow is not None else None,
        )

    async def _produce(
        self, send: ObjectSendStream[RowRequest], journal: Journal, progress: Progress
    ) -> None:
        positions = self.options.positions
        skip_failed = self.options.skip_failed
        position = 0
        batches = self.plan.batches()
        with self._dispatch_scope:
            async with send:
                try:
                    while True:
                        prepared = await anyio.to_thread.run_sync(
                            self._next_batch, batches, journal
                        )
                        if prepared is None:
                            return
                        for _, item, previous in prepared:
                            position += 1
                            if positions is not None and position - 1 not in positions:
                                continue
                            if isinstance(item, Unchanged) or (
                                previous is not None
                                and previous.fingerprint == item.fingerprint
                                and (previous.ok or skip_failed)
                            ):
                                self.tally.skipped += 1
                                progress.advance()
                                continue
                            if isinstance(item, RowFailure):
                                journal.record(failure_outcome(item))
                                self.tally.failed += 1
                                self.tally.errors[f"final:{item.kind}"] += 1
                                progress.advance()
                                continue
                            await send.send(item)
                except BatcherError as exc:
                    self.stop_dispatch(exc)

    def _next_batch(
        self, batches: Iterator[Any], journal: Journal
    ) -> list[tuple[Any, Prepared, Previous | None]] | None:
        """Read, look up and prepare one batch (blocking: runs in a worker thread)."""
        batch = next(batches, None)
        if batch is None:
            return None
        skip_failed = self.options.skip_failed
        return self.plan.prepare(batch, journal.done, lambda p: p.ok or skip_failed)

    async def _work(
        self,
        receive: ObjectReceiveStream[RowRequest],
        worker: RowWorker,
        journal: Journal,
        progress: Progress,
    ) -> None:
        async with receive:
            async for request in receive:
                if self.stopping:
                    continue  # dispatch stopped: leave the rest pending for the next run
                try:
                    outcome = await worker.process(request)
                except Halted:
                    continue  # stopped while it waited to retry: pending for the next run
                except BudgetStop:
                    cap = self.job.config.limits.max_cost_usd
                    self.stop_dispatch(
                        BudgetReachedError(
                            f"the budget limits.max_cost_usd={cap:g} would be crossed "
                            f"(spent ${self.tally.cost_usd:.4f}); raise it and run again to resume"
                        )
                    )
                    continue
                except (KeyRefusedError, AccountError) as exc:
                    self.stop_dispatch(exc)
                    self._work_scope.cancel()
                    return
                try:
                    journal.record(outcome)
                except BatcherError as exc:
                    self.stop_dispatch(exc)
                    self._work_scope.cancel()
                    return
                progress.advance()

    async def _tick(self, flow: FlowController, progress: Progress) -> None:
        """Once a second: the flow controller's clockwork, status lines, the stall check."""
        while True:
            await anyio.sleep(1.0)
            flow.tick()
            progress.tick()
            if flow.stalled() and not self.stopping:
                self.stop_dispatch(
                    RateLimitStallError(
                        "the server answered nothing but 429 (rate limited) for "
                        f"limits.stall_timeout_s={flow.stall_timeout_s:g} s"
                    )
                )
                self._work_scope.deadline = anyio.current_time() + self.options.grace_s

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for received in signals:
                name = signal.Signals(received).name
                if self.writing:
                    if self.abort is None:
                        self.abort = InterruptedRunError(f"interrupted by {name}")
                    self.options.notify(f"{name}: the output is being written; it finishes first")
                    continue
                if self.stopping and isinstance(self.abort, InterruptedRunError):
                    self.options.notify("second interrupt: abandoning requests in flight")
                    self._work_scope.cancel()
                    continue  # keep listening: a later interrupt must not raise mid-write
                self.stop_dispatch(InterruptedRunError(f"interrupted by {name}"))
                self.options.notify(
                    f"{name}: stopping; finishing requests in flight for up to "
                    f"{self.options.grace_s:g} s (interrupt again to skip)"
                )
                self._work_scope.deadline = anyio.current_time() + self.options.grace_s


@asynccontextmanager
async def endpoint(job: Job, simulate: bool) -> AsyncIterator[str]:
    """The base URL to send to: the job's, or a simulator started for the duration."""
    if not simulate:
        yield job.config.endpoint.base_url
        return
    from batcher.sim import serve

    async with serve() as (url, _):
        yield url


def prepare(
    job: Job | str | Path, options: RunOptions, *, api_key_required: bool = True
) -> tuple[Job, Plan]:
    """Load and check everything a run needs; raises ConfigError before anything is sent."""
    if not isinstance(job, Job):
        job = load_job(job)
    if options.simulate:
        config = job.config.model_copy(
            update={"endpoint": job.config.endpoint.model_copy(update={"base_url": SIMULATOR_URL})}
        )
        job = Job(config, job.source)
    plan = Plan(
        job,
        limit=options.limit,
        api_key_required=api_key_required and not options.simulate,
        keep_done=options.keep_done,
    )
    if options.simulate:
        plan.api_key = None
    return job, plan


async def arun(
    job: Job | str | Path, options: RunOptions | None = None, **kwargs: Any
) -> RunSummary:
    """Run a job on the current event loop (use this one in notebooks: ``await arun(...)``)."""
    options = replace(options or RunOptions(), **kwargs)
    job, plan = prepare(job, options)
    run = Run(job, options, plan)
    if job.config.endpoint.mode == "batch":
        batch_run = BatchRun(run)  # checks what batch mode cannot do, before anything is sent
        async with endpoint(job, options.simulate) as base_url:
            return await batch_run.execute(base_url)
    async with endpoint(job, options.simulate) as base_url:
        return await run.execute(base_url)


def run(job: Job | str | Path, options: RunOptions | None = None, **kwargs: Any) -> RunSummary:
    """Run a job to the end and return its summary (blocking)."""
    return anyio.run(lambda: arun(job, options, **kwargs))
