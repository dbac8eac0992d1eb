"""``endpoint.mode: batch``: the same job through the provider Batch API, at batch prices.

Rows that need an answer become JSONL lines, split into chunks by ``batch.max_lines`` and
``batch.max_bytes``; each chunk is journaled, uploaded and created as a batch, in that order,
each step committed before the next. Then the batches are polled every ``batch.poll_s``; a
finished one is collected by custom_id, and its rows that hit a retryable error go into the
next chunk. A rerun re-attaches to every batch the checkpoint knows and never uploads a
submitted row again. Ctrl-C leaves the batches running on the server.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from batcher.batch.api import TERMINAL, BatchApi, NoBatchApiError, TooLargeError
from batcher.batch.book import BatchBook, BookRow, ChunkState
from batcher.batch.lines import Chunk, ChunkWriter, LineRow, custom_id, encode_line
from batcher.batch.progress import BatchProgress
from batcher.batch.results import Collector, read_results
from batcher.errors import (
    AbortError,
    BatchApiError,
    BatcherError,
    BudgetReachedError,
    ConfigError,
    InterruptedRunError,
)
from batcher.images import ImageError, inline_images
from batcher.journal import Journal, Outcome, journal_path
from batcher.outcome import OutcomeBuilder
from batcher.plan import RowFailure, Unchanged
from batcher.request import PROMPT_MARGIN, RowRequest
from batcher.sink import write_output
from batcher.summary import RunSummary
from batcher.worker import failure_outcome

if TYPE_CHECKING:
    from batcher.runner import Run


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
        self.max_lines = self.config.batch.max_lines
        self.max_bytes = self.config.batch.max_bytes
        self.abort: BatcherError | None = None
        self.stopped = False  # no more submissions (budget, refusal, interrupt, --cancel)
        self.cancelled = 0
        self._statuses: Counter[str] = Counter()
        self._started_wall = time.time()
        # Input positions: rows before ``_seen`` were counted (skipped, failed) by this run.
        self._position = 0
        self._seen = 0
        self._committed_usd = 0.0
        self._price = self.prices.get(self.config.request.model)
        max_tokens = self.config.request.max_tokens
        self._max_completion = max_tokens if max_tokens is not None else 1024

    # -- the run -------------------------------------------------------------------------

    async def execute(self, base_url: str) -> RunSummary:
        started = time.monotonic()
        journal_file = journal_path(self.job.checkpoint_dir)
        identity = {
            "input": self.job.input_path,
            "output": str(self.job.output_path),
            "key_column": self.plan.source.key_column,
        }
        fresh = self.options.fresh
        if fresh and journal_file.exists():
            self.options.notify(f"--fresh: replacing the checkpoint {journal_file}")
        # The journal checks the checkpoint's identity and answers "which rows are done";
        # in batch mode every write goes through the book, in its own transactions.
        self.journal = await anyio.to_thread.run_sync(
            lambda: Journal(journal_file, identity, fresh=fresh)
        )
        self.book = await anyio.to_thread.run_sync(BatchBook, journal_file)
        if fresh:
            for stale in self.folder.glob("*"):
                stale.unlink(missing_ok=True)
        total = self.plan.total_rows
        self.progress = BatchProgress(self.tally, total, quiet=self.options.quiet)
        endpoint = self.config.endpoint.model_copy(update={"base_url": base_url})
        try:
            async with BatchApi(endpoint, self.plan.api_key, self.config.retry) as api:
                self.api = api
                try:
                    await api.probe()
                except NoBatchApiError as exc:
                    raise ConfigError(
                        f"{self.job.source}: endpoint.mode: {base_url} does not serve the Batch "
                        f"API ({exc}); set endpoint.mode: live to send the rows one by one"
                    ) from None
                async with anyio.create_task_group() as group:
                    if threading.current_thread() is threading.main_thread():
                        group.start_soon(self._watch_signals, group.cancel_scope)
                    try:
                        await self._main()
                    except AbortError as exc:
                        self._stop(exc)
                    group.cancel_scope.cancel()
        finally:
            self.progress.close()
            await anyio.to_thread.run_sync(self.book.close)
            await anyio.to_thread.run_sync(self.journal.close)
        run = self.run
        written = await anyio.to_thread.run_sync(
            lambda: write_output(self.plan, run.layout, journal_file)
        )
        return self._summary(written.rows, written.ok, written.cost_usd, started)

    def _stop(self, reason: BatcherError) -> None:
        if self.abort is None:
            self.abort = reason
        self.stopped = True

    async def _main(self) -> None:
        await self._show(await anyio.to_thread.run_sync(self.book.active))
        if self.options.cancel:
            await self._cancel_all()
        else:
            await self._recover()
            await self._submit_pending()
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
            if finished and not self.stopped:
                rows = await anyio.to_thread.run_sync(self.book.rows_by_state)
                if rows.get("retry"):
                    await self._submit_pending()

    async def _show(self, active: list[ChunkState]) -> None:
        self._statuses = Counter(c.status or c.state for c in active)
        rows = await anyio.to_thread.run_sync(self.book.rows_by_state)
        self.progress.show(self._statuses, rows)

    # -- submitting ----------------------------------------------------------------------

    async def _submit_pending(self) -> None:
        """Scan the input; every row that needs an answer and is not in flight is submitted."""
        while not self.stopped:
            active = await anyio.to_thread.run_sync(self.book.active)
            self._committed_usd = sum(c.upper_cost_usd for c in active)
            self._position = 0
            writer = ChunkWriter(self.folder, self.max_lines, self.max_bytes)
            batches = self.plan.batches()
            refused = False
            try:
                while not refused:
                    closed, more = await anyio.to_thread.run_sync(self._fill, batches, writer)
                    if not more:  # the input's end, or the budget's: send what fits
                        last = writer.close()
                        closed += [last] if last is not None else []
                    for chunk in closed:
                        if refused or not await self._submit(chunk):
                            refused = True
                            await anyio.Path(chunk.path).unlink(missing_ok=True)
                    if not more:
                        break
            finally:
                writer.discard()
            if not refused:
                return

    def _fill(self, batches: Iterator[Any], writer: ChunkWriter) -> tuple[list[Chunk], bool]:
        """Write the lines of one input batch; the chunks they closed, and whether there is
        more input (blocking: runs in a worker thread)."""
        batch = next(batches, None)
        if batch is None or self.stopped:
            return [], False
        skip_failed = self.options.skip_failed
        prepared = self.plan.prepare(batch, self.journal.done, lambda p: p.ok or skip_failed)
        booked = self.book.rows([key for key, _, _ in prepared])
        closed: list[Chunk] = []
        failures: list[Outcome] = []
        cap = self.config.limits.max_cost_usd
        for key, item, previous in prepared:
            fresh = self._position >= self._seen  # first time this run looks at the row
            self._position += 1
            self._seen = max(self._seen, self._position)
            if isinstance(item, Unchanged) or (
                previous is not None
                and previous.fingerprint == item.fingerprint
                and (previous.ok or skip_failed)
            ):
                if fresh:
                    self.tally.skipped += 1
                    self.progress.advance()
                continue
            if isinstance(item, RowFailure):
                if fresh:
                    failures.append(self._failed_before(failure_outcome(item)))
                continue
            row = booked.get(key)
            if row is not None and row.state == "submitted":
                continue  # in a batch in flight: its result will come
            if (
                row is not None
                and row.state == "done"
                and (row.settled_at or 0) >= self._started_wall
            ):
                continue  # finally failed in this run: a rerun tries it again
            attempt = row.attempts + 1 if row is not None and row.state == "retry" else 1
            submission = row.submissions + 1 if row is not None else 1
            try:
                body = inline_images(item, self.plan.images) if item.images else item.body
            except ImageError as exc:
                failures.append(self._failed_before(_line_failure(item, "image_error", str(exc))))
                continue
            identifier = custom_id(key, submission)
            line = encode_line(identifier, body)
            if not writer.fits_alone(line):
                message = (
                    f"the request is {len(line):,} bytes, over batch.max_bytes={self.max_bytes:,}"
                )
                failures.append(self._failed_before(_line_failure(item, "too_large", message)))
                continue
            upper = self._upper_cost(item)
            if cap is not None and self.tally.cost_usd + self._committed_usd + upper > cap:
                self._stop(
                    BudgetReachedError(
                        f"the budget limits.max_cost_usd={cap:g} would be crossed "
                        f"(spent ${self.tally.cost_usd:.4f}, ${self._committed_usd:.4f} "
                        "held for batches at their upper bound); raise it and run again to resume"
                    )
                )
                break
            self._committed_usd += upper
            row_line = LineRow(
                key, identifier, item.fingerprint, item.input_digest, attempt, submission, upper
            )
            done = writer.add(line, row_line)
            if done is not None:
                closed.append(done)
        if failures:
            self.book.record_failures(failures)
        return closed, not self.stopped

    def _settled_now(self, row: BookRow) -> bool:
        return row.settled_at is not None and row.settled_at >= self._started_wall

    def _failed_before(self, outcome: Outcome) -> Outcome:
        self.tally.failed += 1
        self.tally.errors[f"final:{outcome.error_kind}"] += 1
        self.progress.advance()
        return outcome

    def _upper_cost(self, request: RowRequest) -> float:
        """An upper bound of a line's cost: the prompt with the heuristic's margin, every
        choice at max_tokens, at batch prices."""
        if self._price is None:
            return 0.0
        choices = self.config.request.n or 1
        prompt = request.estimated_tokens - self._max_completion * choices
        return self._price.cost(
            math.ceil(max(prompt, 0) * PROMPT_MARGIN), self._max_completion * choices
        )

    async def _submit(self, chunk: Chunk) -> bool:
        """Journal, upload and create one chunk; False if the server found it too large."""
        await anyio.to_thread.run_sync(self.book.add_chunk, chunk)
        self.tally.requests += len(chunk.rows)
        self.tally.retries += sum(1 for row in chunk.rows if row.attempt > 1)
        return await self._upload(chunk.name, chunk.path, len(chunk.rows), chunk.bytes)

    async def _upload(self, name: str, path: Path, lines: int, size: int) -> bool:
        try:
            file_id = await self.api.upload(path)
        except TooLargeError as exc:
            await self._too_large(name, path, lines, size, str(exc), lines_refused=False)
            return False
        await anyio.to_thread.run_sync(self.book.set_uploaded, name, file_id)
        return await self._create(name, path, file_id, lines, size)

    async def _create(self, name: str, path: Path, file_id: str, lines: int, size: int) -> bool:
        try:
            batch_id = await self.api.create(file_id, self.config.batch.completion_window, name)
        except TooLargeError as exc:
            await self._too_large(name, path, lines, size, str(exc), lines_refused=True)
            return False
        await anyio.to_thread.run_sync(self.book.set_submitted, name, batch_id, None)
        self._statuses["submitted"] += 1
        await anyio.Path(path).unlink(missing_ok=True)
        return True

    async def _too_large(
        self, name: str, path: Path, lines: int, size: int, message: str, *, lines_refused: bool
    ) -> None:
        """The server refused a chunk for its size: halve the limits and submit its rows again."""
        if lines <= 1:
            raise BatchApiError(f"the server refuses even a one-request batch: {message}")
        await anyio.to_thread.run_sync(self.book.drop_chunk, name)
        await anyio.Path(path).unlink(missing_ok=True)
        self.tally.requests -= lines
        if lines_refused:
            self.max_lines = max(1, min(self.max_lines, lines // 2))
        self.max_bytes = max(1024, min(self.max_bytes, size // 2))
        self.options.notify(
            f"the server refused a batch of {lines} lines, {size:,} bytes, as too large "
            f"({message}); splitting into batches of at most {self.max_lines} lines, "
            f"{self.max_bytes:,} bytes"
        )

    # -- re-attaching and collecting -----------------------------------------------------

    async def _recover(self) -> None:
        """Finish what a killed run left between journal and server: never upload twice."""
        active = await anyio.to_thread.run_sync(self.book.active)
        kept = {f"batcher-{chunk.name}.jsonl" for chunk in active}
        async for stale in anyio.Path(self.folder).glob("batcher-*"):
            if stale.name not in kept:  # written, never journaled: its rows were not sent
                await stale.unlink(missing_ok=True)
        for chunk in active:
            path = self.folder / f"batcher-{chunk.name}.jsonl"
            if chunk.state == "prepared":
                file_id = await self.api.find_file(path.name)
                if file_id is not None:
                    await anyio.to_thread.run_sync(self.book.set_uploaded, chunk.name, file_id)
                    await self._create(chunk.name, path, file_id, chunk.lines, chunk.bytes)
                elif path.exists():
                    await self._upload(chunk.name, path, chunk.lines, chunk.bytes)
                else:
                    await anyio.to_thread.run_sync(self.book.drop_chunk, chunk.name)
            elif chunk.state == "uploaded" and chunk.file_id is not None:
                found = await self.api.find_batch(chunk.name)
                if found is not None:
                    await anyio.to_thread.run_sync(
                        self.book.set_submitted, chunk.name, str(found["id"]), found.get("status")
                    )
                else:
                    await self._create(chunk.name, path, chunk.file_id, chunk.lines, chunk.bytes)

    async def _finish(self, chunk: ChunkState, batch: dict[str, Any]) -> None:
        """Collect a batch that ended: every line that completed is kept, whatever the end."""
        status = str(batch.get("status"))
        counts = batch.get("request_counts") or {}
        if status == "failed" and not counts.get("completed") and _refused_as_too_large(batch):
            message = _errors_text(batch)
            path = self.folder / f"batcher-{chunk.name}.jsonl"
            await self._too_large(
                chunk.name, path, chunk.lines, chunk.bytes, message, lines_refused=True
            )
            return
        contents = []
        for field in ("output_file_id", "error_file_id"):
            if batch.get(field):
                contents.append(await self.api.content(str(batch[field])))
        results = read_results(*contents)
        rows = await anyio.to_thread.run_sync(self.book.rows_in, chunk.name)
        collected = self.collector.collect(rows, results, status, chunk.cancel_requested)
        await anyio.to_thread.run_sync(
            self.book.collect, chunk.name, status, collected.outcomes, collected.updates
        )
        self.progress.advance(len(collected.outcomes))
        if collected.stop is not None:
            self._stop(collected.stop)

    async def _cancel_all(self) -> None:
        """``--cancel``: cancel every batch in flight and forget chunks never created."""
        self._stop(AbortError("cancelled"))
        for chunk in await anyio.to_thread.run_sync(self.book.active):
            batch_id = chunk.batch_id
            if batch_id is None and chunk.state == "uploaded":
                found = await self.api.find_batch(chunk.name)
                if found is not None:
                    batch_id = str(found["id"])
                    await anyio.to_thread.run_sync(
                        self.book.set_submitted, chunk.name, batch_id, found.get("status")
                    )
            if batch_id is None:
                await anyio.to_thread.run_sync(self.book.drop_chunk, chunk.name)
                stale = anyio.Path(self.folder / f"batcher-{chunk.name}.jsonl")
                await stale.unlink(missing_ok=True)
                continue
            # Journal first: the rows of a batch we cancel come back uncounted.
            await anyio.to_thread.run_sync(self.book.set_cancel_requested, chunk.name)
            try:
                await self.api.cancel(batch_id)
            except BatchApiError as exc:
                self.options.notify(f"cannot cancel batch {batch_id}: {exc}")
                continue
            self.cancelled += 1
        self.abort = AbortError(
            f"cancelled {self.cancelled} batch(es) in flight as asked; "
            "rerun without --cancel to submit their rows again"
        )

    async def _watch_signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for received in signals:
                name = signal.Signals(received).name
                running = sum(self._statuses.values())
                message = (
                    f"interrupted by {name}: {running} batch(es) keep running on the server and "
                    "will be billed; rerun the same command to collect them, or cancel them with "
                    f"`batcher cancel {self.job.source}`"
                )
                self._stop(InterruptedRunError(message))
                self.options.notify(message)
                scope.cancel()
                return

    def _summary(self, rows: int, ok: int, output_cost: float, started: float) -> RunSummary:
        t = self.tally
        total = self.plan.total_rows
        resume = None
        if self.abort is not None:
            resume = self.options.resume_command or f"batcher run {self.job.source}"
        return RunSummary(
            output_path=self.plan.output_path,
            rows_total=total,
            rows_ok=ok,
            rows_failed=rows - ok,
            rows_pending=total - rows,
            rows_skipped=t.skipped,
            requests=t.requests,
            retries=t.retries,
            rate_limited=t.rate_limited,
            prompt_tokens=t.prompt_tokens,
            completion_tokens=t.completion_tokens,
            cost_usd=t.cost_usd,
            output_cost_usd=output_cost,
            wall_s=time.monotonic() - started,
            errors=dict(t.errors),
            warnings=dict(t.warnings),
            aborted=str(self.abort) if self.abort is not None else None,
            resume_command=resume,
        )


def _line_failure(request: RowRequest, kind: str, message: str) -> Outcome:
    return failure_outcome(
        RowFailure(request.key, request.fingerprint, kind, message, request.input_digest)
    )


def _errors_text(batch: dict[str, Any]) -> str:
    errors = (batch.get("errors") or {}).get("data") or []
    return "; ".join(str(e.get("message") or e.get("code")) for e in errors if isinstance(e, dict))


def _refused_as_too_large(batch: dict[str, Any]) -> bool:
    errors = (batch.get("errors") or {}).get("data") or []
    text = " ".join(f"{e.get('code')} {e.get('message')}" for e in errors if isinstance(e, dict))
    return any(word in text.lower() for word in ("too large", "too many", "exceed"))
