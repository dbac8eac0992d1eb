"""``endpoint.mode: batch``: the same job through the provider Batch API, at batch prices.

The submitter turns pending rows into batches (``submit.py``); this module runs the whole:
it polls the batches every ``batch.poll_s``, collects a finished one by custom_id
(``results.py``), sends the rows that hit a retryable error in new batches, and writes the
output at the end, whatever the end was. A rerun re-attaches to every batch the checkpoint
knows; Ctrl-C leaves the batches running on the server; ``--cancel`` cancels them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from batcher.errors import (
    AbortError,
    BatcherError,
    ConfigError,
)
from batcher.runs.batch.api import TERMINAL, BatchApi, NoBatchApiError
from batcher.runs.batch.book import BatchBook, ChunkState
from batcher.runs.batch.cancel import cancel_in_flight
from batcher.runs.batch.control import RunControl, watch_signals
from batcher.runs.batch.filler import Filler
from batcher.runs.batch.progress import BatchProgress
from batcher.runs.batch.results import Collector, collect_batch
from batcher.runs.batch.submit import Submitter
from batcher.runs.summary import RunSummary
from batcher.send.outcome import OutcomeBuilder
from batcher.store.journal import Journal, journal_path
from batcher.store.output import Written, write_output

if TYPE_CHECKING:
    from batcher.runs.shell import Run


def check_batch_job(run: Run) -> None:
    """What the Batch API cannot do, found before anything is sent."""
    job = run.job
    request = job.config.request
    if request.stream:
        raise ConfigError(
            f"{job.source}: request.stream: the Batch API does not stream; "
            "set it to false with endpoint.mode: batch"
        )
    if request.n_mode == "fanout" and (request.n or 1) > 1:
        raise ConfigError(
            f"{job.source}: request.n_mode: fanout sends several requests per row, which batch "
            "mode does not; use n_mode: native with endpoint.mode: batch"
        )
    if len(request.models) > 1:
        raise ConfigError(
            f"{job.source}: request.model: batch mode takes one model per job; "
            "run a job per model, or use endpoint.mode: live for a list"
        )


class BatchRun:
    """One execution of a job in batch mode; ``execute`` returns its summary."""

    def __init__(self, run: Run) -> None:
        check_batch_job(run)
        self.run = run
        self.job = run.job
        self.options = run.options
        self.plan = run.plan
        self.config = run.job.config
        self.tally = run.tally
        self.prices = run.prices.for_batch()
        builder = OutcomeBuilder(self.config, self.prices, self.tally)
        self.collector = Collector(self.config, builder, run.parser, self.plan.api_key)
        self.folder = self.job.checkpoint_dir / "batches"
        self.control = RunControl()  # stops submitting: budget, refusal, interrupt, --cancel
        self.cancelled = 0
        self._statuses: Counter[str] = Counter()

    # -- the run -------------------------------------------------------------------------

    async def execute(self, base_url: str) -> RunSummary:
        started = time.monotonic()
        journal_file = journal_path(self.job.checkpoint_dir)
        self.journal, self.book = await anyio.to_thread.run_sync(
            _open_checkpoint, self.run, journal_file, self.folder
        )
        total = self.plan.total_rows
        self.progress = BatchProgress(self.tally, total, quiet=self.options.quiet)
        endpoint = self.config.endpoint.model_copy(update={"base_url": base_url})
        try:
            async with BatchApi(endpoint, self.plan.api_key, self.config.retry) as api:
                self.api = api
                filler = Filler(
                    self.run, self.journal, self.book, self.progress, self.prices, self.control
                )
                self.submitter = Submitter(self.run, self.book, api, self.control, filler)
                try:
                    await api.probe()
                except NoBatchApiError as exc:
                    raise _no_batch_api(self.job.source, base_url, exc) from None
                # anyio wraps what a task group's body raises in an ExceptionGroup: run
                # failures are taken out here and raised as they are, after the group.
                failure: BatcherError | None = None
                async with anyio.create_task_group() as group:
                    if threading.current_thread() is threading.main_thread():
                        group.start_soon(
                            watch_signals,
                            self.control,
                            self.options.notify,
                            self._running,
                            self.job.source,
                            group.cancel_scope,
                        )
                    try:
                        await self._main()
                    except AbortError as exc:
                        self.control.stop(exc)
                    except NoBatchApiError as exc:
                        failure = _no_batch_api(self.job.source, base_url, exc)
                    except BatcherError as exc:
                        failure = exc
                    group.cancel_scope.cancel()
                if failure is not None:
                    raise failure
        finally:
            self.progress.close()
            await anyio.to_thread.run_sync(self.book.close)
            await anyio.to_thread.run_sync(self.journal.close)
        run = self.run
        written = await anyio.to_thread.run_sync(
            lambda: write_output(self.plan, run.layout, journal_file)
        )
        return self._summary(written, started)

    async def _main(self) -> None:
        await self._show(await anyio.to_thread.run_sync(self.book.active))
        if self.options.cancel:
            await self._cancel_all()
        else:
            await self.submitter.recover()
            await self.submitter.submit_pending()
        while True:
            active = await anyio.to_thread.run_sync(self.book.active)
            await self._show(active)
            if not active:
                return
            await anyio.sleep(self.config.batch.poll_s)
            finished = 0
            for chunk in active:
                if chunk.batch_id is None:
                    continue
                batch = await self.api.get(chunk.batch_id)
                status = str(batch.get("status"))
                if status != chunk.status:
                    await anyio.to_thread.run_sync(self.book.set_status, chunk.name, status)
                if status in TERMINAL:
                    await self._finish(chunk, batch)
                    finished += 1
            if finished and not self.control.stopped:
                rows = await anyio.to_thread.run_sync(self.book.rows_by_state)
                if rows.get("retry"):
                    await self.submitter.submit_pending()

    async def _show(self, active: list[ChunkState]) -> None:
        self._statuses = Counter(c.status or c.state for c in active)
        self.submitter.created.clear()  # counted in the statuses from now on
        rows = await anyio.to_thread.run_sync(self.book.rows_by_state)
        self.progress.show(self._statuses, rows)

    async def _finish(self, chunk: ChunkState, batch: dict[str, Any]) -> None:
        """Collect a batch that ended: every line that completed is kept, whatever the end."""
        status = str(batch.get("status"))
        counts = batch.get("request_counts") or {}
        if status == "failed" and not counts.get("completed") and _refused_as_too_large(batch):
            message = _errors_text(batch)
            path = self.folder / f"batcher-{chunk.name}.jsonl"
            await self.submitter.too_large(
                chunk.name, path, chunk.lines, chunk.bytes, message, lines_refused=True
            )
            return
        collected = await collect_batch(
            chunk, batch, self.api, self.book, self.collector, self.progress.advance
        )
        if collected is not None:
            self.control.stop(collected)

    async def _cancel_all(self) -> None:
        """``--cancel``: cancel every batch in flight and forget chunks never created."""
        self.control.stop(AbortError("cancelled"))
        self.cancelled = await cancel_in_flight(
            self.book, self.api, self.folder, self.options.notify
        )
        self.control.abort = AbortError(
            f"cancelled {self.cancelled} batch(es) in flight as asked; "
            "rerun without --cancel to submit their rows again"
        )

    def _running(self) -> int:
        """Batches running on the server, as far as this run knows."""
        return sum(self._statuses.values()) + sum(self.submitter.created.values())

    def _summary(self, written: Written, started: float) -> RunSummary:
        return RunSummary.of_run(
            self.tally,
            output_path=self.plan.output_path,
            rows_total=self.plan.total_rows,
            rows_ok=written.ok,
            rows_failed=written.rows - written.ok,
            output_cost_usd=written.cost_usd,
            written=written,
            started=started,
            aborted=self.control.abort,
            resume_command=self.options.resume_command or f"batcher run {self.job.source}",
        )


def _errors_text(batch: dict[str, Any]) -> str:
    errors = (batch.get("errors") or {}).get("data") or []
    return "; ".join(str(e.get("message") or e.get("code")) for e in errors if isinstance(e, dict))


def _refused_as_too_large(batch: dict[str, Any]) -> bool:
    errors = (batch.get("errors") or {}).get("data") or []
    text = " ".join(f"{e.get('code')} {e.get('message')}" for e in errors if isinstance(e, dict))
    return any(word in text.lower() for word in ("too large", "too many", "exceed"))


def _no_batch_api(source: Path, base_url: str, exc: NoBatchApiError) -> ConfigError:
    return ConfigError(
        f"{source}: endpoint.mode: {base_url} does not serve the Batch API "
        f"({exc}); set endpoint.mode: live to send the rows one by one"
    )


def _open_checkpoint(run: Run, journal_file: Path, folder: Path) -> tuple[Journal, BatchBook]:
    """The journal (it checks the checkpoint's identity and answers "which rows are done")
    and the book: in batch mode every write goes through the book, in its own transactions.
    With --fresh both start empty and chunk files left by earlier runs are removed
    (blocking: run in a thread)."""
    job, fresh = run.job, run.options.fresh
    identity = {
        "input": job.input_path,
        "output": str(job.output_path),
        "key_column": run.plan.source.key_column,
    }
    if fresh and journal_file.exists():
        run.options.notify(f"--fresh: replacing the checkpoint {journal_file}")
    journal = Journal(journal_file, identity, fresh=fresh)
    book = BatchBook(journal_file)
    if fresh:
        for stale in folder.glob("*"):
            stale.unlink(missing_ok=True)
    return journal, book
