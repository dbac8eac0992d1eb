"""A run: the producer reads and prepares rows, a fixed pool of workers sends them, the journal
keeps every outcome, and the output is rebuilt at the end, whatever the end was."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from batcher.config import Job, LimitsConfig
from batcher.errors import (
    BatcherError,
    OutputError,
)
from batcher.flow.controller import FlowController
from batcher.rows.plan import Plan, plan_job
from batcher.rows.request import REASONING_MODELS
from batcher.runs.batch import BatchRun
from batcher.runs.live import Dispatch
from batcher.runs.progress import Progress
from batcher.runs.stopping import Stopping
from batcher.runs.summary import RunSummary
from batcher.send.parse import parser_for
from batcher.send.prices import PriceTable
from batcher.send.tally import Tally
from batcher.store.journal import Journal, journal_path
from batcher.store.lock import RunLock
from batcher.store.output import Written, check_output_target, layout_for, write_output

GRACE_S = 10.0


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

    def __init__(self, plan: Plan, options: RunOptions) -> None:
        self.job = job = plan.job
        self.options = options
        self.plan = plan
        config = job.config
        self.parser = parser_for(job)
        self.layout = layout_for(plan, self.parser)
        self.prices = PriceTable.for_job(job, options.prices_path)
        self.tally = Tally()
        request = config.request
        for model in request.models if request.reasoning_effort not in (None, "none") else ():
            if model not in REASONING_MODELS:
                warning = f"model {model} is not listed as supporting reasoning_effort"
                self.tally.warnings[warning] += 1
                options.notify(f"warning: {warning}")
        self.stopping = Stopping(options.notify, options.grace_s)
        self.flow: FlowController | None = None

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
                    watch.start_soon(self.stopping.watch_signals)
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
        options = self.options
        dispatch = Dispatch(
            self.plan,
            journal,
            self.stopping,
            self.tally,
            parser=self.parser,
            prices=self.prices,
            positions=options.positions,
            skip_failed=options.skip_failed,
            flow=options.flow_factory(self.plan.job.config.limits),
        )
        self.flow = dispatch.flow
        total = self.plan.total_rows if options.positions is None else len(options.positions)
        progress = Progress(
            self.tally, total, quiet=options.quiet, flow=self.flow, every_s=options.progress_every_s
        )
        try:
            await dispatch.run(base_url, progress)
        finally:
            progress.close()
            failure = await anyio.to_thread.run_sync(journal.close)
        if failure is not None:
            self.stopping.stop_dispatch(failure)
        self.stopping.writing = True
        written = await self._write(journal.path)
        if written.stopped is not None and self.stopping.abort is None:
            # The input broke at a row: what is before it stands.
            self.stopping.abort = written.stopped
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

    async def _write(self, journal_file: Path) -> Written:
        """Rebuild the output; if that fails, say so in one line with how to rebuild it."""
        plan, layout = self.plan, self.layout
        try:
            return await anyio.to_thread.run_sync(lambda: write_output(plan, layout, journal_file))
        except OutputError as exc:
            resume = self.options.resume_command or f"batcher run {self.job.source}"
            abort = self.stopping.abort
            reason = f"{abort}; then " if abort is not None else ""
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
            written=written,
            started=started,
            aborted=self.stopping.abort,
            resume_command=self.options.resume_command or f"batcher run {self.job.source}",
            flow=self.flow.report() if self.flow is not None else None,
        )


@asynccontextmanager
async def endpoint(job: Job, simulate: bool) -> AsyncIterator[str]:
    """The base URL to send to: the job's, or a simulator started for the duration."""
    if not simulate:
        yield job.config.endpoint.base_url
        return
    from batcher.sim import serve

    async with serve() as (url, _):
        yield url


async def arun(
    job: Job | str | Path, options: RunOptions | None = None, **kwargs: Any
) -> RunSummary:
    """Run a job on the current event loop (use this one in notebooks: ``await arun(...)``)."""
    options = replace(options or RunOptions(), **kwargs)
    plan = plan_job(
        job, limit=options.limit, simulate=options.simulate, keep_done=options.keep_done
    )
    job = plan.job
    run = Run(plan, options)
    if job.config.endpoint.mode == "batch":
        batch_run = BatchRun(run)  # checks what batch mode cannot do, before anything is sent
        async with endpoint(job, options.simulate) as base_url:
            return await batch_run.execute(base_url)
    async with endpoint(job, options.simulate) as base_url:
        return await run.execute(base_url)


def run(job: Job | str | Path, options: RunOptions | None = None, **kwargs: Any) -> RunSummary:
    """Run a job to the end and return its summary (blocking)."""
    return anyio.run(lambda: arun(job, options, **kwargs))
