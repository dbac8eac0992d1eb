"""Submitting: the rows that need an answer, as batches on the server.

The input is scanned in order; each row that has no answer (and is not in a batch in flight)
becomes a line, lines fill chunks up to ``batch.max_lines`` and ``batch.max_bytes``, and each
chunk is journaled, uploaded and created, each step committed before the next. A chunk the
server refuses as too large halves the limits and its rows go into the next, smaller chunks.
A rerun first finishes what a killed run left between the journal and the server.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from batcher.batch.api import BatchApi, TooLargeError
from batcher.batch.book import BatchBook, BookRow
from batcher.batch.lines import Chunk, ChunkWriter, LineRow, custom_id, encode_line
from batcher.batch.progress import BatchProgress
from batcher.budget import upper_cost
from batcher.columns import Outcome
from batcher.errors import BatchApiError, BatcherError, BudgetReachedError
from batcher.images import ImageError, inline_images
from batcher.journal import Journal
from batcher.plan import RowFailure, Unchanged
from batcher.prices import PriceTable
from batcher.request import RowRequest

if TYPE_CHECKING:
    from batcher.runner import Run


@dataclass(slots=True)
class RunControl:
    """Whether a batch run still submits, and why it stopped; shared by its parts."""

    abort: BatcherError | None = None
    stopped: bool = False

    def stop(self, reason: BatcherError) -> None:
        if self.abort is None:
            self.abort = reason
        self.stopped = True


class Submitter:
    """Turns a run's pending rows into batches; ``created`` counts the batches it created."""

    def __init__(
        self,
        run: Run,
        journal: Journal,
        book: BatchBook,
        api: BatchApi,
        progress: BatchProgress,
        prices: PriceTable,
        control: RunControl,
    ) -> None:
        self.plan = run.plan
        self.options = run.options
        self.config = run.job.config
        self.tally = run.tally
        self.journal = journal
        self.book = book
        self.api = api
        self.progress = progress
        self.control = control
        self.folder = run.job.checkpoint_dir / "batches"
        self.max_lines = self.config.batch.max_lines
        self.max_bytes = self.config.batch.max_bytes
        self.created: Counter[str] = Counter()
        self._price = prices.get(self.config.request.models[0])
        max_tokens = self.config.request.max_tokens
        self._max_completion = max_tokens if max_tokens is not None else 1024
        self._started_wall = time.time()
        # Input positions: rows before ``_seen`` were counted (skipped, failed) by this run.
        self._position = 0
        self._seen = 0
        self._committed_usd = 0.0
        self._failed_here: set[Any] = set()  # keys whose line could not be written, this run

    async def submit_pending(self) -> None:
        """Scan the input; every row that needs an answer and is not in flight is submitted."""
        while not self.control.stopped:
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
        if batch is None or self.control.stopped:
            return [], False
        skip_failed = self.options.skip_failed
        prepared = self.plan.prepare(batch, self.journal.done, lambda p: p.ok or skip_failed)
        booked = self.book.rows([key for key, _, _ in prepared])
        closed: list[Chunk] = []
        failures: list[Outcome] = []
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
                    failures.append(self._failed_before(item.outcome()))
                continue
            if key in self._failed_here:
                continue  # its line could not be written (image, size): failed this run
            row = booked.get(key)
            if row is not None and row.state == "submitted":
                continue  # in a batch in flight: its result will come
            if row is not None and row.state == "done" and self._settled_now(row):
                continue  # finally failed in this run: a rerun tries it again
            made = self._line(key, item, row, writer)
            if isinstance(made, Outcome):
                self._failed_here.add(key)
                failures.append(self._failed_before(made))
                continue
            line, line_row = made
            if self._over_budget(line_row.upper_cost_usd):
                break
            self._committed_usd += line_row.upper_cost_usd
            done = writer.add(line, line_row)
            if done is not None:
                closed.append(done)
        if failures:
            self.book.record_failures(failures)
        return closed, not self.control.stopped

    def _line(
        self, key: Any, item: RowRequest, row: BookRow | None, writer: ChunkWriter
    ) -> tuple[bytes, LineRow] | Outcome:
        """A row's JSONL line, or the failure that keeps it from being sent."""
        attempt = row.attempts + 1 if row is not None and row.state == "retry" else 1
        submission = row.submissions + 1 if row is not None else 1
        try:
            body = inline_images(item, self.plan.images) if item.images else item.body
        except ImageError as exc:
            return _line_failure(item, "image_error", str(exc))
        identifier = custom_id(key, submission)
        line = encode_line(identifier, body)
        if not writer.fits_alone(line):
            message = f"the request is {len(line):,} bytes, over batch.max_bytes={self.max_bytes:,}"
            return _line_failure(item, "too_large", message)
        upper = self._upper_cost(item)
        fingerprint, digest = item.fingerprint, item.input_digest
        return line, LineRow(key, identifier, fingerprint, digest, attempt, submission, upper)

    def _over_budget(self, upper_usd: float) -> bool:
        """Would this line cross limits.max_cost_usd, with every batch at its upper bound?"""
        cap = self.config.limits.max_cost_usd
        if cap is None or self.tally.cost_usd + self._committed_usd + upper_usd <= cap:
            return False
        self.control.stop(
            BudgetReachedError(
                f"the budget limits.max_cost_usd={cap:g} would be crossed "
                f"(spent ${self.tally.cost_usd:.4f}, ${self._committed_usd:.4f} "
                "held for batches at their upper bound); raise it and run again to resume"
            )
        )
        return True

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
        return upper_cost(self._price, request, self._max_completion, choices, choices)

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
            await self.too_large(name, path, lines, size, str(exc), lines_refused=False)
            return False
        await anyio.to_thread.run_sync(self.book.set_uploaded, name, file_id)
        return await self._create(name, path, file_id, lines, size)

    async def _create(self, name: str, path: Path, file_id: str, lines: int, size: int) -> bool:
        try:
            batch_id = await self.api.create(file_id, self.config.batch.completion_window, name)
        except TooLargeError as exc:
            await self.too_large(name, path, lines, size, str(exc), lines_refused=True)
            return False
        await anyio.to_thread.run_sync(self.book.set_submitted, name, batch_id, None)
        self.created["submitted"] += 1
        await anyio.Path(path).unlink(missing_ok=True)
        return True

    async def too_large(
        self, name: str, path: Path, lines: int, size: int, message: str, *, lines_refused: bool
    ) -> None:
        """The server refused a chunk for its size: halve the limits and submit its rows again."""
        if lines <= 1:
            raise BatchApiError(f"the server refuses even a one-request batch: {message}")
        await anyio.to_thread.run_sync(self.book.drop_chunk, name)
        await anyio.Path(path).unlink(missing_ok=True)
        self.tally.requests = max(self.tally.requests - lines, 0)
        if lines_refused:
            self.max_lines = max(1, min(self.max_lines, lines // 2))
        self.max_bytes = max(1024, min(self.max_bytes, size // 2))
        self.options.notify(
            f"the server refused a batch of {lines} lines, {size:,} bytes, as too large "
            f"({message}); splitting into batches of at most {self.max_lines} lines, "
            f"{self.max_bytes:,} bytes"
        )

    # -- re-attaching and collecting -----------------------------------------------------

    async def recover(self) -> None:
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


def _line_failure(request: RowRequest, kind: str, message: str) -> Outcome:
    return Outcome.failed(
        request.key, request.fingerprint, kind, message, input_digest=request.input_digest
    )
