"""Batch mode's bookkeeping, in the job's checkpoint: every chunk (file, batch) and each row's
state, committed before the step it describes, so a killed run, a rerun or ``batcher status``
knows every batch in flight and no row is ever uploaded twice.

A chunk goes ``prepared`` (its rows journaled, its file on disk) → ``uploaded`` (file id) →
``submitted`` (batch id) → ``collected`` (its rows' outcomes written in the same transaction).
A row is ``submitted`` (in a chunk), ``retry`` (waiting for another submission) or ``done``
(its outcome is in the outcomes table).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batcher.runs.batch.lines import Chunk, LineRow
from batcher.store.columns import Outcome
from batcher.store.journal import connect, insert_outcomes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_chunks (
    chunk TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    file_id TEXT, batch_id TEXT, status TEXT,
    lines INTEGER NOT NULL, bytes INTEGER NOT NULL, upper_cost_usd REAL NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_rows (
    key PRIMARY KEY NOT NULL,
    custom_id TEXT NOT NULL,
    chunk TEXT,
    state TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    input_digest BLOB,
    attempts INTEGER NOT NULL,
    submissions INTEGER NOT NULL,
    upper_cost_usd REAL NOT NULL,
    error TEXT,
    first_submitted_at REAL NOT NULL,
    settled_at REAL
);
CREATE INDEX IF NOT EXISTS batch_rows_chunk ON batch_rows (chunk);
"""
_SHOWN = 10  # batches named by `batcher status`


@dataclass(frozen=True, slots=True)
class BookRow:
    key: Any
    custom_id: str
    chunk: str | None
    state: str
    fingerprint: bytes
    input_digest: bytes | None
    attempts: int
    submissions: int
    error: str | None
    first_submitted_at: float
    settled_at: float | None  # wall time it became done: a run settles a row only once
    upper_cost_usd: float = 0.0  # what its line held against the cap when submitted


_ROW_COLUMNS = (
    "key, custom_id, chunk, state, fingerprint, input_digest, attempts, submissions, error, "
    "first_submitted_at, settled_at, upper_cost_usd"
)


@dataclass(frozen=True, slots=True)
class ChunkState:
    name: str
    state: str
    file_id: str | None
    batch_id: str | None
    status: str | None
    lines: int
    bytes: int
    upper_cost_usd: float
    cancel_requested: bool


@dataclass(frozen=True, slots=True)
class RowUpdate:
    """A collected row's new state: ``done`` (with its outcome), or ``retry``."""

    key: Any
    state: str
    attempts: int
    error: str | None = None


def has_book(connection: sqlite3.Connection) -> bool:
    found = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'batch_chunks'"
    ).fetchone()
    return found is not None


class BatchBook:
    """The batch tables of one checkpoint. Every method commits before it returns (blocking)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = connect(path)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- reading ---------------------------------------------------------------------------

    def rows(self, keys: Sequence[Any]) -> dict[Any, BookRow]:
        found = self._db.execute(
            f"SELECT {_ROW_COLUMNS} FROM batch_rows WHERE key IN (SELECT value FROM json_each(?))",
            (orjson.dumps(list(keys)).decode(),),
        ).fetchall()
        return {row[0]: BookRow(*row) for row in found}

    def rows_in(self, chunk: str) -> list[BookRow]:
        found = self._db.execute(
            f"SELECT {_ROW_COLUMNS} FROM batch_rows WHERE chunk = ? AND state = 'submitted'",
            (chunk,),
        ).fetchall()
        return [BookRow(*row) for row in found]

    def active(self) -> list[ChunkState]:
        """Chunks not yet collected, oldest first."""
        found = self._db.execute(
            "SELECT chunk, state, file_id, batch_id, status, lines, bytes, upper_cost_usd, "
            "cancel_requested FROM batch_chunks WHERE state != 'collected' ORDER BY created_at"
        ).fetchall()
        return [
            ChunkState(
                name=row[0],
                state=row[1],
                file_id=row[2],
                batch_id=row[3],
                status=row[4],
                lines=row[5],
                bytes=row[6],
                upper_cost_usd=row[7],
                cancel_requested=bool(row[8]),
            )
            for row in found
        ]

    def rows_by_state(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, count(*) FROM batch_rows GROUP BY state"))

    # -- writing ---------------------------------------------------------------------------

    def add_chunk(self, chunk: Chunk) -> None:
        """Journal a chunk and its rows as submitted in it, before its file is uploaded."""
        now = time.time()
        with self._db:
            self._db.execute(
                "INSERT INTO batch_chunks (chunk, state, lines, bytes, upper_cost_usd, created_at)"
                " VALUES (?, 'prepared', ?, ?, ?, ?)",
                (chunk.name, len(chunk.rows), chunk.bytes, chunk.upper_cost_usd, now),
            )
            self._db.executemany(
                "INSERT INTO batch_rows (key, custom_id, chunk, state, fingerprint, input_digest,"
                " attempts, submissions, upper_cost_usd, error, first_submitted_at)"
                " VALUES (?, ?, ?, 'submitted', ?, ?, ?, ?, ?, NULL, ?)"
                " ON CONFLICT (key) DO UPDATE SET custom_id = excluded.custom_id,"
                " chunk = excluded.chunk, state = 'submitted', fingerprint = excluded.fingerprint,"
                " input_digest = excluded.input_digest, attempts = excluded.attempts,"
                " submissions = excluded.submissions, upper_cost_usd = excluded.upper_cost_usd,"
                " first_submitted_at = CASE WHEN excluded.attempts = 1"
                " THEN excluded.first_submitted_at ELSE first_submitted_at END",
                [_row_values(row, chunk.name, now) for row in chunk.rows],
            )

    def set_uploaded(self, chunk: str, file_id: str) -> None:
        with self._db:
            self._db.execute(
                "UPDATE batch_chunks SET state = 'uploaded', file_id = ? WHERE chunk = ?",
                (file_id, chunk),
            )

    def set_submitted(self, chunk: str, batch_id: str, status: str | None) -> None:
        with self._db:
            self._db.execute(
                "UPDATE batch_chunks SET state = 'submitted', batch_id = ?, status = ? "
                "WHERE chunk = ?",
                (batch_id, status, chunk),
            )

    def set_status(self, chunk: str, status: str) -> None:
        with self._db:
            self._db.execute("UPDATE batch_chunks SET status = ? WHERE chunk = ?", (status, chunk))

    def set_cancel_requested(self, chunk: str) -> None:
        with self._db:
            self._db.execute(
                "UPDATE batch_chunks SET cancel_requested = 1 WHERE chunk = ?", (chunk,)
            )

    def drop_chunk(self, chunk: str) -> None:
        """Forget a chunk that never ran; its rows wait for another submission, uncounted."""
        with self._db:
            self._db.execute(
                "UPDATE batch_rows SET state = 'retry', chunk = NULL, attempts = attempts - 1 "
                "WHERE chunk = ? AND state = 'submitted'",
                (chunk,),
            )
            self._db.execute("DELETE FROM batch_chunks WHERE chunk = ?", (chunk,))

    def record_failures(self, outcomes: Iterable[Outcome]) -> None:
        """Rows that failed before any line was written (a bad image, a template error)."""
        with self._db:
            insert_outcomes(self._db, outcomes)

    def collect(
        self, chunk: str, status: str | None, outcomes: list[Outcome], updates: list[RowUpdate]
    ) -> None:
        """Rows of a finished batch with their outcomes, in one transaction; with ``status``
        (the last rows) the chunk is collected."""
        now = time.time()
        with self._db:
            insert_outcomes(self._db, outcomes)
            self._db.executemany(
                "UPDATE batch_rows SET state = ?, attempts = ?, error = ?, chunk = NULL, "
                "settled_at = CASE WHEN ? = 'done' THEN ? ELSE NULL END WHERE key = ?",
                [(u.state, u.attempts, u.error, u.state, now, u.key) for u in updates],
            )
            if status is not None:
                self._db.execute(
                    "UPDATE batch_chunks SET state = 'collected', status = ? WHERE chunk = ?",
                    (status, chunk),
                )


def _row_values(row: LineRow, chunk: str, now: float) -> tuple[Any, ...]:
    return (
        row.key,
        row.custom_id,
        chunk,
        row.fingerprint,
        row.input_digest,
        row.attempt,
        row.submission,
        row.upper_cost_usd,
        now,
    )


def describe(connection: sqlite3.Connection) -> list[str]:
    """``batcher status`` lines about batches: those in flight and rows by state."""
    if not has_book(connection):
        return []
    chunks = connection.execute(
        "SELECT batch_id, state, status, lines FROM batch_chunks WHERE state != 'collected' "
        "ORDER BY created_at"
    ).fetchall()
    rows = dict(connection.execute("SELECT state, count(*) FROM batch_rows GROUP BY state"))
    return [
        f"batches in flight: {len(chunks)}"
        + (
            " ("
            + ", ".join(f"{b or '(not created)'} {s or st} {n} rows" for b, st, s, n in chunks)
            + ")"
            if chunks
            else ""
        ),
        f"batch rows: {rows.get('submitted', 0)} submitted, {rows.get('retry', 0)} waiting to "
        f"be resubmitted, {rows.get('done', 0)} done",
    ]
