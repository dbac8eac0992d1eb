"""The checkpoint: every answered or finally failed row, in SQLite (WAL), keyed by row key.

One writer thread owns the write connection and commits in small transactions (every
``COMMIT_INTERVAL_S`` or ``COMMIT_ROWS`` rows), so the event loop never waits on the disk and a
SIGKILL loses at most one uncommitted batch. Reads (which rows are done, the rebuild of the
output, ``batcher status``) use their own connections; WAL lets them run beside the writer.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from batcher.errors import (
    CheckpointCorruptError,
    CheckpointError,
    ConfigError,
    JournalMismatchError,
)

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


def verify(connection: sqlite3.Connection, path: Path) -> None:
    """Raise CheckpointCorruptError unless SQLite's structural check passes.

    ``quick_check`` reads every page once: 0.3 s for a 1,000,000-row (200 MB) journal, so a
    damaged file is found at the start rather than by a lookup mid-run.
    """
    first = str(connection.execute("PRAGMA quick_check(1)").fetchone()[0])
    if first != "ok":
        raise corrupt(path, first.replace("*** in database main ***", "").strip())


def corrupt(path: Path, detail: str) -> CheckpointCorruptError:
    detail = " ".join(detail.split())[:200]
    return CheckpointCorruptError(
        f"{path}: the checkpoint is damaged ({detail}); run with --fresh to replace it "
        "(its rows are then sent again)"
    )


class Journal:
    """The checkpoint of one job; ``record`` from the event loop, ``close`` at the end.

    ``legacy`` maps an identity name to older spellings of the same value (absolute paths,
    before identities became relative to the job file): a checkpoint holding one of them is
    this job's, and its identity is rewritten in the new spelling.
    """

    def __init__(
        self,
        path: Path,
        identity: dict[str, str],
        *,
        fresh: bool = False,
        legacy: Mapping[str, str] | None = None,
    ) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"{path.parent}: cannot create the checkpoint folder: {exc.strerror}"
            ) from None
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
            verify(self._writer, path)
            self._check_identity(identity, legacy or {})
            self._reader = connect(path)
        except sqlite3.OperationalError as exc:  # before DatabaseError, its parent
            raise ConfigError(f"{path}: cannot open the checkpoint: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise corrupt(path, str(exc)) from None
        self._inode = os.stat(path).st_ino
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.failure: CheckpointError | None = None
        self._thread = threading.Thread(
            target=self._write_loop, name="batcher-journal", daemon=True
        )
        self._thread.start()

    def _check_identity(self, identity: dict[str, str], legacy: Mapping[str, str]) -> None:
        stored = dict(self._writer.execute("SELECT name, value FROM meta").fetchall())
        if not stored:
            with self._writer:
                self._writer.executemany("INSERT INTO meta VALUES (?, ?)", identity.items())
            return
        for name, value in identity.items():
            if stored.get(name) != value and stored.get(name) != legacy.get(name):
                raise JournalMismatchError(
                    f"{self.path}: this checkpoint belongs to another job "
                    f"({name} was {stored.get(name)!r}, now {value!r}); "
                    "run with --fresh to replace it, or set output.checkpoint_dir"
                )
        if any(stored.get(name) != value for name, value in identity.items()):
            with self._writer:
                self._writer.executemany("REPLACE INTO meta VALUES (?, ?)", identity.items())

    # -- writing ---------------------------------------------------------------------------

    def record(self, outcome: Outcome) -> None:
        """Queue one row's outcome; it is committed within COMMIT_INTERVAL_S."""
        if self.failure is not None:
            raise self.failure
        self._queue.put(outcome.as_row())

    def _moved(self) -> bool:
        """Whether the journal file was deleted or replaced since it was opened.

        SQLite keeps writing to a deleted file through its open descriptor, silently: every
        commit would vanish with the last close.
        """
        try:
            return os.stat(self.path).st_ino != self._inode
        except FileNotFoundError:
            return True

    def _restore(self) -> CheckpointError:
        """Copy every committed row from the open (deleted) journal back to its path."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)
            self._writer.execute("VACUUM INTO ?", (str(self.path),))
        except (OSError, sqlite3.Error) as exc:
            return CheckpointError(
                f"{self.path}: the checkpoint was deleted during the run and could not be "
                f"restored ({exc}); the rows it held will be sent again"
            )
        return CheckpointError(
            f"{self.path}: the checkpoint was deleted during the run; every committed row "
            "was restored to it; run again to continue"
        )

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
                self.failure = CheckpointError(
                    f"{self.path}: cannot write the checkpoint ({exc}); the rows committed "
                    "before are kept; free space and run again to continue"
                )
                return
            if self._moved():
                self.failure = self._restore()
                return
            if stop:
                return

    def close(self) -> CheckpointError | None:
        """Commit what is queued and stop the writer (blocking: call from a thread).

        Returns the writer's failure, if any, rather than raising it: the caller still has an
        output to rebuild from what was committed.
        """
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._writer.close()
        self._reader.close()
        return self.failure

    # -- reading ---------------------------------------------------------------------------

    def done(self, keys: Sequence[Any]) -> dict[Any, Previous]:
        """What the journal holds for each of ``keys`` it has."""
        try:
            rows = self._reader.execute(
                "SELECT key, fingerprint, ok, input_digest FROM outcomes "
                "WHERE key IN (SELECT value FROM json_each(?))",
                (orjson.dumps(list(keys)).decode(),),
            ).fetchall()
        except sqlite3.Error as exc:
            raise CheckpointError(f"{self.path}: cannot read the checkpoint: {exc}") from None
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
