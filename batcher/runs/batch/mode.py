"""``endpoint.mode: batch``: the same job through the provider Batch API, at batch prices.

The submitter turns pending rows into batches (``submit.py``); this engine runs the whole
inside the run's shell: it polls the batches every ``batch.poll_s``, collects a finished one
by custom_id (``results.py``) and sends the rows that hit a retryable error in new batches;
the shell writes the output at the end, whatever the end was. A rerun re-attaches to every
batch the checkpoint knows; Ctrl-C leaves the batches running on the server; ``--cancel``
cancels them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import anyio

from batcher.config import Job
from batcher.errors import AbortError, ConfigError
from batcher.runs.batch.api import TERMINAL, BatchApi, NoBatchApiError
from batcher.runs.batch.book import BatchBook, ChunkState
from batcher.runs.batch.cancel import cancel_in_flight
from batcher.runs.batch.filler import Filler
from batcher.runs.batch.progress import BatchProgress
from batcher.runs.batch.results import Collector, collect_batch
from batcher.runs.batch.submit import Submitter
from batcher.runs.context import RunContext, RunOptions
from batcher.runs.stopping import Interrupt
from batcher.send.outcome import OutcomeBuilder


def check_batch_job(job: Job) -> None:
    """What the Batch API cannot do, found before anything is sent."""
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


class BatchEngine:
    """Batch mode inside the run's shell: submits pending rows as batches, polls them and
    collects what they answered into the journal."""

    def __init__(self, job: Job, options: RunOptions) -> None:
        check_batch_job(job)
        self.job = job
        self.options = options
        self.config = job.config
        self.folder = job.checkpoint_dir / "batches"
        self.cancelled = 0
        self._statuses: Counter[str] = Counter()
        self._created: Counter[str] = Counter()

    def interrupted(self, signal_name: str) -> Interrupt:
        """A first interrupt stops polling at once: the batches keep running on the server."""
        message = (
            f"interrupted by {signal_name}: {self._running()} batch(es) keep running on the "
            "server and will be billed; rerun the same command to collect them, or cancel "
            f"them with `batcher cancel {self.job.source}`"
        )
        return Interrupt(message, message, 0.0)

    def flow_report(self) -> None:
        return None

    async def send(self, context: RunContext) -> None:
        self.stopping = context.stopping
        self.first_rows = context.first_rows
        self.plan = context.plan
        self.tally = context.tally
        prices = context.prices.for_batch()
        builder = OutcomeBuilder(self.config, prices, self.tally, secret=self.plan.api_key)
        self.collector = Collector(self.config, builder, context.parser, self.plan.api_key)
        self.book = await anyio.to_thread.run_sync(self._open_book, context.journal.path)
        self.progress = BatchProgress(self.tally, self.plan.total_rows, quiet=self.options.quiet)
        base_url = context.base_url
        endpoint = self.config.endpoint.model_copy(update={"base_url": base_url})
        try:
            async with BatchApi(endpoint, self.plan.api_key, self.config.retry) as api:
                self.api = api
                filler = Filler(context, self.book, self.progress, prices)
                self.submitter = Submitter(context, self.book, api, filler)
                self._created = self.submitter.created
                try:
                    await api.probe()
                    with self.stopping.work_scope:
                        await self._main()
                except NoBatchApiError as exc:
                    raise _no_batch_api(self.job.source, base_url, exc) from None
        finally:
            self.progress.close()
            await anyio.to_thread.run_sync(self.book.close)

    def _open_book(self, journal_file: Path) -> BatchBook:
        """The book of batches, in the journal's file; with --fresh the chunk files left by
        earlier runs go too (blocking: run in a thread)."""
        book = BatchBook(journal_file)
        if self.options.fresh:
            for stale in self.folder.glob("*"):
                stale.unlink(missing_ok=True)
        return book

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
            if finished and not self.stopping.stopping:
                rows = await anyio.to_thread.run_sync(self.book.rows_by_state)
                # Rows to retry, or rows that waited for the cap held by the batches ended.
                if rows.get("retry") or self.submitter.filler.waiting:
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
            chunk,
            batch,
            self.api,
            self.book,
            self.collector,
            self.progress.advance,
            self.first_rows.settled,
        )
        if collected is not None:
            self.stopping.stop_dispatch(collected)

    async def _cancel_all(self) -> None:
        """``--cancel``: cancel every batch in flight and forget chunks never created."""
        self.stopping.stop_dispatch(AbortError("cancelled"))
        self.cancelled = await cancel_in_flight(
            self.book, self.api, self.folder, self.options.notify
        )
        self.stopping.abort = AbortError(
            f"cancelled {self.cancelled} batch(es) in flight as asked; "
            "rerun without --cancel to submit their rows again"
        )

    def _running(self) -> int:
        """Batches running on the server, as far as this run knows."""
        return sum(self._statuses.values()) + sum(self._created.values())


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
