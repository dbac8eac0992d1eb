"""The run: the one shell every mode runs in. It alone takes the lock, checks the checkpoint's
identity and the output target, opens and closes the journal, watches signals, keeps the stop
reason, rebuilds the output and builds the summary; its engine (live or batch) sends the rows.
``--ray`` runs many of these runs, one per shard, and adds their summaries."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import anyio

from batcher.config import Job
from batcher.errors import AbortError, BatcherError, BudgetReachedError, OutputError
from batcher.flow.controller import FlowReport
from batcher.rows.plan import Plan, plan_job
from batcher.rows.request import REASONING_MODELS
from batcher.runs.batch.mode import BatchEngine
from batcher.runs.context import GRACE_S, Engine, RunContext, RunOptions
from batcher.runs.first_rows import FirstRows
from batcher.runs.live import LiveEngine
from batcher.runs.stopping import Stopping
from batcher.runs.summary import RunSummary
from batcher.send.budget import budget_reached
from batcher.send.parse import parser_for
from batcher.send.prices import PriceTable
from batcher.send.tally import Tally
from batcher.store.journal import Journal, connect, journal_path, spent
from batcher.store.lock import RunLock
from batcher.store.output import Written, check_output_target, layout_for, write_output

__all__ = ["GRACE_S", "Run", "RunOptions", "arun", "checkpoint_identity", "endpoint", "run"]


def checkpoint_identity(job: Job, key_column: str) -> tuple[dict[str, str], dict[str, str]]:
    """The checkpoint's identity, the same in every mode: the job's name (two jobs on one
    output path would pay for each other's rows in turn), its paths relative to the job file,
    so a moved project folder keeps its checkpoint; and the absolute spelling that older
    checkpoints (and batch mode before the one shell) stored."""
    folder = job.source.parent
    output = job.output_path
    identity = {
        "name": job.config.name,
        "input": os.path.relpath(job.input_path, folder),
        "output": os.path.relpath(output, folder),
        "key_column": key_column,
    }
    return identity, {"input": job.input_path, "output": str(output)}


class Run:
    """One execution of a job; ``execute`` returns its summary. ``mode`` overrides the job's
    ``endpoint.mode`` (``estimate --sample`` runs its rows live whatever the mode)."""

    def __init__(
        self, plan: Plan, options: RunOptions, *, mode: Literal["live", "batch"] | None = None
    ) -> None:
        self.job = job = plan.job
        self.options = options
        self.plan = plan
        config = job.config
        self.parser = parser_for(job)
        self.layout = layout_for(
            plan.output_rows(), self.parser.columns, config.request, job.source
        )
        self.prices = PriceTable.for_job(job, options.prices_path)
        self.tally = Tally()
        self.spent_before_usd = 0.0  # the job's spend before this run, once the journal is open
        request = config.request
        for model in request.models if request.reasoning_effort not in (None, "none") else ():
            if model not in REASONING_MODELS:
                warning = f"model {model} is not listed as supporting reasoning_effort"
                self.tally.warnings[warning] += 1
                options.notify(f"warning: {warning}")
        self.stopping = Stopping(options.notify)
        # Built now: what an engine cannot do is found before anything is sent.
        self.engine: Engine = (
            BatchEngine(job, options)
            if (mode or config.endpoint.mode) == "batch"
            else LiveEngine(options.flow_factory(config.limits), options.grace_s)
        )

    @property
    def resume_command(self) -> str:
        return self.options.resume_command or f"batcher run {self.job.source}"

    async def execute(self, base_url: str) -> RunSummary:
        started = time.monotonic()
        check_output_target(self.job.source, self.plan.output_path)
        lock = RunLock(self.job.checkpoint_dir)
        try:
            journal = await anyio.to_thread.run_sync(self._open_journal)
            self.stopping.watch(journal)
            self.spent_before_usd = await anyio.to_thread.run_sync(self._spent_before, journal)
            context = RunContext(
                plan=self.plan,
                options=self.options,
                journal=journal,
                stopping=self.stopping,
                tally=self.tally,
                parser=self.parser,
                prices=self.prices,
                base_url=base_url,
                first_rows=FirstRows(self.job.config.limits.early_stop_rows, self.stopping),
                spent_before_usd=self.spent_before_usd,
            )
            # Signals are watched until the output is written: one arriving during the write
            # must neither kill the process nor raise a KeyboardInterrupt into it.
            error: BatcherError | None = None
            async with anyio.create_task_group() as watch:
                if threading.current_thread() is threading.main_thread():
                    watch.start_soon(self.stopping.watch_signals, self.engine.interrupted)
                try:
                    written = await self._send_and_write(context)
                except BatcherError as exc:
                    error = exc  # raised below, outside the task group's exception group
                finally:
                    watch.cancel_scope.cancel()
        finally:
            lock.release()
        if error is not None:
            raise error
        return self._summary(written, started, self.engine.flow_report())

    def _open_journal(self) -> Journal:
        """The job's journal, its identity checked (blocking: run in a thread)."""
        path = journal_path(self.job.checkpoint_dir)
        identity, legacy = checkpoint_identity(self.job, self.plan.source.key_column)
        if self.options.fresh and path.exists():
            self.options.notify(f"--fresh: replacing the checkpoint {path}")
        return Journal(path, identity, fresh=self.options.fresh, legacy=legacy)

    def _spent_before(self, journal: Journal) -> float:
        """What the job spent before this run (a fresh checkpoint: nothing), when a cap
        needs it; paid replies of rows stopped mid-way, answers asked again and replies
        whose output did not parse all count (blocking: run in a thread)."""
        if self.job.config.limits.max_cost_usd is None:
            return 0.0
        connection = connect(journal.path, readonly=True)
        try:
            return spent(connection).cost_usd
        finally:
            connection.close()

    async def _send_and_write(self, context: RunContext) -> Written:
        stopping = self.stopping
        try:
            await self.engine.send(context)
        except AbortError as exc:
            stopping.stop_dispatch(exc)  # what was answered before it is kept and written
        finally:
            failure = await anyio.to_thread.run_sync(context.journal.close)
        if failure is not None:
            stopping.stop_dispatch(failure)
        stopping.writing = True
        written = await self._write(context.journal.path)
        if written.stopped is not None and stopping.abort is None:
            # The input broke at a row: what is before it stands.
            stopping.abort = written.stopped
        return written

    async def _write(self, journal_file: Path) -> Written:
        """Rebuild the output; if that fails, say so in one line with how to rebuild it."""
        layout = self.layout
        try:
            return await anyio.to_thread.run_sync(lambda: write_output(layout, journal_file))
        except OutputError as exc:
            abort = self.stopping.abort
            reason = f"{abort}; then " if abort is not None else ""
            raise OutputError(
                f"{reason}{exc}; every answer is kept in the checkpoint: fix that and run "
                f"`{self.resume_command}` to rebuild the output (rows already answered are "
                "not sent again)"
            ) from None

    def _summary(self, written: Written, started: float, flow: FlowReport | None) -> RunSummary:
        aborted = self.stopping.abort
        cap = self.job.config.limits.max_cost_usd
        if isinstance(aborted, BudgetReachedError) and cap is not None:
            # What the job spent in the end, its requests in flight settled, in every mode
            # (an engine's reason says what was spent when it stopped dispatching).
            aborted = budget_reached(
                cap,
                max(written.spent.cost_usd, self.spent_before_usd + self.tally.cost_usd),
                request_usd=aborted.request_usd,
                output_limited=aborted.output_limited,
            )
        return RunSummary.of_run(
            self.tally,
            output_path=self.plan.output_path,
            rows_total=self.plan.total_rows,
            rows_ok=written.ok,
            rows_failed=written.failed,
            output_cost_usd=written.cost_usd,
            written=written,
            started=started,
            aborted=aborted,
            resume_command=self.resume_command,
            flow=flow,
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
    run = Run(plan, options)
    async with endpoint(plan.job, options.simulate) as base_url:
        return await run.execute(base_url)


def run(job: Job | str | Path, options: RunOptions | None = None, **kwargs: Any) -> RunSummary:
    """Run a job to the end and return its summary (blocking)."""
    return anyio.run(lambda: arun(job, options, **kwargs))
