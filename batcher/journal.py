"""The checkpoint: every answered or finally failed row, in SQLite (WAL), keyed by row key.

One writer thread owns the write connection and commits in small transactions (every
``COMMIT_INTERVAL_S`` or ``COMMIT_ROWS`` rows), so the event loop never waits on the disk and a
SIGKILL loses at most one uncommitted batch. Reads (which rows are done, the rebuild of the
output, ``batcher status``) use their own connections; WAL lets them run beside the writer.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from batcher.errors import ConfigError, JournalMismatchError

COMMIT_INTERVAL_S = 0.5
COMMIT_ROWS = 256
# Outcome columns in the order they are stored and read back.
OUTCOME_COLUMNS = (
    "fingerprint",
    "ok",
    "error_kind",
    "response",
    "finish_reason",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cost_usd",
    "latency_s",
    "attempts",
    "error",
    "response_id",
    "extra",
    "input_digest",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outcomes (
    key PRIMARY KEY NOT NULL,
    fingerprint BLOB NOT NULL,
    ok INTEGER NOT NULL,
    error_kind TEXT,
    response TEXT, finish_reason TEXT, model TEXT,
    prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER,
    cached_tokens INTEGER, cost_usd REAL, latency_s REAL, attempts INTEGER,
    error TEXT, response_id TEXT, extra TEXT, input_digest BLOB
);
"""
_INSERT = (
    f"INSERT OR REPLACE INTO outcomes (key, {', '.join(OUTCOME_COLUMNS)}) "
    f"VALUES ({', '.join('?' * (len(OUTCOME_COLUMNS) + 1))})"
)
_STOP = object()


class Previous(NamedTuple):
    """A row's last outcome as the journal knows it."""

    fingerprint: bytes
    ok: bool
    input_digest: bytes | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """The final result of one row, as the journal stores it."""

    key: Any
    fingerprint: bytes
    ok: bool
    error_kind: str | None
    response: str | None
    finish_reason: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None
    cost_usd: float | None
    latency_s: float | None
    attempts: int
    error: str | None
    response_id: str | None
    extra: dict[str, Any] | None
    input_digest: bytes | None = None

    def as_row(self) -> tuple[Any, ...]:
        extra = orjson.dumps(self.extra).decode() if self.extra else None
        return (
            self.key,
            self.fingerprint,
            int(self.ok),
            self.error_kind,
            self.response,
            self.finish_reason,
            self.model,
            self.prompt_tokens,
            self.completion_tokens,
            self.total_tokens,
            self.cached_tokens,
            self.cost_usd,
            self.latency_s,
            self.attempts,
            self.error,
            self.response_id,
            extra,
            self.input_digest,
        )


def journal_path(checkpoint_dir: Path) -> Path:
    return checkpoint_dir / "journal.sqlite"


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        connection = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=30
        )
    else:
        connection = sqlite3.connect(path, check_same_thread=False, timeout=30)
        connection.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a killed process; only an OS crash can lose a commit.
        connection.execute("PRAGMA synchronous=NORMAL")
    return connection


class Journal:
    """The checkpoint of one job; ``record`` from the event loop, ``close`` at the end."""

    def __init__(self, path: Path, identity: dict[str, str], *, fresh: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and path.exists():
            for stale in (
                path,
                path.with_name(path.name + "-wal"),
                path.with_name(path.name + "-shm"),
            ):
                stale.unlink(missing_ok=True)
        try:
            self._writer = connect(path)
            self._writer.executescript(_SCHEMA)
            self._check_identity(identity)
            self._reader = connect(path)
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{path}: checkpoint journal is unreadable: {exc}") from None
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.failure: BaseException | None = None
        self._thread = threading.Thread(
            target=self._write_loop, name="batcher-journal", daemon=True
        )
        self._thread.start()

    def _check_identity(self, identity: dict[str, str]) -> None:
        stored = dict(self._writer.execute("SELECT name, value FROM meta").fetchall())
        if not stored:
            with self._writer:
                self._writer.executemany("INSERT INTO meta VALUES (?, ?)", identity.items())
            return
        for name, value in identity.items():
            if stored.get(name) != value:
                raise JournalMismatchError(
                    f"{self.path}: this checkpoint belongs to another job "
                    f"({name} was {stored.get(name)!r}, now {value!r}); "
                    "run with --fresh to replace it, or set output.checkpoint_dir"
                )

    # -- writing ---------------------------------------------------------------------------

    def record(self, outcome: Outcome) -> None:
        """Queue one row's outcome; it is committed within COMMIT_INTERVAL_S."""
        if self.failure is not None:
            raise self.failure
        self._queue.put(outcome.as_row())

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch: list[Any] = [item]
            deadline = time.monotonic() + COMMIT_INTERVAL_S
            stop = False
            while len(batch) < COMMIT_ROWS:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            try:
                with self._writer:
                    self._writer.executemany(_INSERT, batch)
            except sqlite3.Error as exc:
                self.failure = ConfigError(f"{self.path}: cannot write the checkpoint: {exc}")
                return
            if stop:
                return

    def close(self) -> None:
        """Commit what is queued and stop the writer (blocking: call from a thread)."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._writer.close()
        self._reader.close()
        if self.failure is not None:
            raise self.failure

    # -- reading ---------------------------------------------------------------------------

    def done(self, keys: Sequence[Any]) -> dict[Any, Previous]:
        """What the journal holds for each of ``keys`` it has."""
        rows = self._reader.execute(
            "SELECT key, fingerprint, ok, input_digest FROM outcomes "
            "WHERE key IN (SELECT value FROM json_each(?))",
            (orjson.dumps(list(keys)).decode(),),
        ).fetchall()
        return {key: Previous(print_, bool(ok), digest) for key, print_, ok, digest in rows}


def fetch_outcomes(connection: sqlite3.Connection, keys: Iterable[Any]) -> list[tuple[Any, ...]]:
    """``(key, *OUTCOME_COLUMNS)`` for each of ``keys`` the journal has."""
    return connection.execute(
        f"SELECT key, {', '.join(OUTCOME_COLUMNS)} FROM outcomes "
        "WHERE key IN (SELECT value FROM json_each(?))",
        (orjson.dumps(list(keys)).decode(),),
    ).fetchall()


def insert_outcomes(connection: sqlite3.Connection, outcomes: Iterable[Outcome]) -> None:
    """Write outcomes inside the caller's transaction (batch mode commits them together with
    the state of the batch they came from)."""
    connection.executemany(_INSERT, [outcome.as_row() for outcome in outcomes])
