"""Submitting: the rows that need an answer, as batches on the server.

The input is scanned in order; each row that has no answer (and is not in a batch in flight)
becomes a line, lines fill chunks up to ``batch.max_lines`` and ``batch.max_bytes``, and each
chunk is journaled, uploaded and created, each step committed before the next. A chunk the
server refuses as too large halves the limits and its rows go into the next, smaller chunks.
A rerun first finishes what a killed run left between the journal and the server.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from batcher.errors import BatchApiError
from batcher.runs.batch.api import BatchApi, TooLargeError
from batcher.runs.batch.book import BatchBook
from batcher.runs.batch.filler import Filler
from batcher.runs.batch.lines import Chunk, ChunkWriter

if TYPE_CHECKING:
    from batcher.runs.context import RunContext


class Submitter:
    """Turns a run's pending rows into batches; ``created`` counts the batches it created."""

    def __init__(self, context: RunContext, book: BatchBook, api: BatchApi, filler: Filler) -> None:
        job = context.plan.job
        self.notify = context.options.notify
        self.batch = job.config.batch
        self.tally = context.tally
        self.book = book
        self.api = api
        self.stopping = context.stopping
        self.filler = filler
        self.folder = job.checkpoint_dir / "batches"
        self.max_lines = self.batch.max_lines
        self.max_bytes = self.batch.max_bytes
        self.created: Counter[str] = Counter()

    async def submit_pending(self) -> None:
        """Scan the input; every row that needs an answer and is not in flight is submitted."""
        while not self.stopping.stopping:
            active = await anyio.to_thread.run_sync(self.book.active)
            self.filler.rescan(sum(c.upper_cost_usd for c in active))
            writer = ChunkWriter(self.folder, self.max_lines, self.max_bytes)
            batches = self.filler.plan.batches()
            refused = False
            try:
                while not refused:
                    closed, more = await anyio.to_thread.run_sync(self.filler.fill, batches, writer)
                    if self.filler.budget_reached is not None:
                        self.stopping.stop_dispatch(self.filler.budget_reached)
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
            batch_id = await self.api.create(file_id, self.batch.completion_window, name)
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
        self.notify(
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
