"""Batch input files: one JSONL line per row, split into chunks by lines *and* bytes.

A chunk is written beside the checkpoint (``<checkpoint>/batches/<chunk>.jsonl``) and renamed
into place when complete, so a chunk the journal knows always has its whole file until the
server has it.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from batcher.runs.batch.api import CHAT_URL


def custom_id(key: Any, submission: int) -> str:
    """Unique per row and submission, and valid for every server: ``^[A-Za-z0-9_-]{1,64}$``."""
    token = hashlib.blake2b(orjson.dumps(key), digest_size=12).hexdigest()
    return f"r{token}-{submission}"


def encode_line(identifier: str, body: dict[str, Any]) -> bytes:
    """One request line, its body exactly as a live request sends it."""
    line = {"custom_id": identifier, "method": "POST", "url": CHAT_URL, "body": body}
    return orjson.dumps(line) + b"\n"


@dataclass(frozen=True, slots=True)
class LineRow:
    """What the journal keeps of one line: enough to match its result to its row."""

    key: Any
    custom_id: str
    fingerprint: bytes
    input_digest: bytes | None
    attempt: int  # submissions of this row so far, this one included (``attempts``)
    submission: int  # submissions of this row ever (custom_id's suffix)
    upper_cost_usd: float


@dataclass(slots=True)
class Chunk:
    """A complete batch input file and the rows in it."""

    name: str
    path: Path
    rows: list[LineRow] = field(default_factory=list)
    bytes: int = 0

    @property
    def upper_cost_usd(self) -> float:
        return sum(row.upper_cost_usd for row in self.rows)


class ChunkWriter:
    """Appends lines to the current chunk; a line that would cross a limit starts the next."""

    def __init__(self, folder: Path, max_lines: int, max_bytes: int) -> None:
        self.folder = folder
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        folder.mkdir(parents=True, exist_ok=True)
        self._current: Chunk | None = None
        self._handle: Any = None

    @property
    def pending(self) -> Chunk | None:
        return self._current

    def fits_alone(self, line: bytes) -> bool:
        return len(line) <= self.max_bytes

    def add(self, line: bytes, row: LineRow) -> Chunk | None:
        """Add one line (it must fit alone); returns the chunk it closed, if any."""
        closed = None
        current = self._current
        if current is not None and (
            len(current.rows) >= self.max_lines or current.bytes + len(line) > self.max_bytes
        ):
            closed = self.close()
        if self._current is None:
            name = uuid.uuid4().hex
            self._current = Chunk(name, self.folder / f"batcher-{name}.jsonl")
            self._handle = self._partial(self._current).open("wb")
        self._handle.write(line)
        self._current.rows.append(row)
        self._current.bytes += len(line)
        return closed

    def close(self) -> Chunk | None:
        """Finish the current chunk (flushed, synced, renamed into place)."""
        chunk = self._current
        if chunk is None:
            return None
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._partial(chunk).replace(chunk.path)
        self._current = None
        self._handle = None
        return chunk

    def discard(self) -> None:
        """Drop the chunk being written (a stopped run); its rows were never journaled."""
        if self._current is not None:
            self._handle.close()
            self._partial(self._current).unlink(missing_ok=True)
            self._current = None
            self._handle = None

    @staticmethod
    def _partial(chunk: Chunk) -> Path:
        return chunk.path.with_suffix(".partial")
