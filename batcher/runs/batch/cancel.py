"""`batcher cancel`: every batch in flight cancelled, chunks never created forgotten."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio

from batcher.errors import BatchApiError
from batcher.runs.batch.api import BatchApi
from batcher.runs.batch.book import BatchBook


async def cancel_in_flight(
    book: BatchBook, api: BatchApi, folder: Path, notify: Callable[[str], None]
) -> int:
    """Cancel each batch the book has in flight; how many were cancelled."""
    cancelled = 0
    for chunk in await anyio.to_thread.run_sync(book.active):
        batch_id = chunk.batch_id
        if batch_id is None and chunk.state == "uploaded":
            found = await api.find_batch(chunk.name)
            if found is not None:
                batch_id = str(found["id"])
                await anyio.to_thread.run_sync(
                    book.set_submitted, chunk.name, batch_id, found.get("status")
                )
        if batch_id is None:
            await anyio.to_thread.run_sync(book.drop_chunk, chunk.name)
            await anyio.Path(folder / f"batcher-{chunk.name}.jsonl").unlink(missing_ok=True)
            continue
        # Journal first: the rows of a batch we cancel come back uncounted.
        await anyio.to_thread.run_sync(book.set_cancel_requested, chunk.name)
        try:
            await api.cancel(batch_id)
        except BatchApiError as exc:
            notify(f"cannot cancel batch {batch_id}: {exc}")
            continue
        cancelled += 1
    return cancelled
