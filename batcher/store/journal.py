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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import polars as pl

from batcher.errors import (
    CheckpointCorruptError,
    CheckpointError,
    ConfigError,
    JournalMismatchError,
    shorten,
)
from batcher.store.columns import (
    COLUMN_NAMES,
    COLUMNS,
    INTERRUPTED,
    SCHEMA,
    UNPRICED_SQL,
    Outcome,
)
from batcher.store.spend import Spend
from batcher.store.values import as_row, fitted

COMMIT_INTERVAL_S = 0.5
COMMIT_ROWS = 256
_OUTCOME_COLUMNS = ", ".join(f"{c.name} {c.sql}" for c in COLUMNS)
# What an outcome leaves behind when a new one for its key replaces it (a failed row retried,
# a row asked again after --keep-done or an edited prompt): summed per key, so the journal
# keeps what every attempt cost while growing by one row per key asked again, at most. Each
# entry: the column, its SQL type, its value from the replaced row (``old``).
_SUPERSEDED = (
    ("times", "INTEGER", "1"),
    ("prompt_tokens", "INTEGER", "coalesce(old.prompt_tokens, 0)"),
    ("completion_tokens", "INTEGER", "coalesce(old.completion_tokens, 0)"),
    ("cost_usd", "REAL", "coalesce(old.cost_usd, 0.0)"),
    ("unpriced_rows", "INTEGER", UNPRICED_SQL.format(row="old.")),
)
_SUPERSEDED_NAMES = tuple(name for name, _, _ in _SUPERSEDED)
# The writer's upsert fires the trigger only on a key already present, so new rows (nearly
# all) cost what they did; a row that cost nothing (it failed before any reply) leaves
# nothing. It fires on an update of the fingerprint, which only a new outcome sets (the
# upsert sets every column), not on a fix-up of a column in place; INSERT OR REPLACE (the
# ray merge, a plain copy) fires no UPDATE trigger.
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outcomes (key PRIMARY KEY NOT NULL, {_OUTCOME_COLUMNS});
CREATE TABLE IF NOT EXISTS superseded (
    key PRIMARY KEY NOT NULL, {", ".join(f"{name} {sql} NOT NULL" for name, sql, _ in _SUPERSEDED)}
);
"""
# Created once the columns it reads are there (after ``_add_new_columns`` on an old journal).
_TRIGGER = f"""
CREATE TRIGGER IF NOT EXISTS outcomes_superseded AFTER UPDATE OF fingerprint ON outcomes
WHEN old.cost_usd IS NOT NULL OR {UNPRICED_SQL.format(row="old.")}
BEGIN
    INSERT INTO superseded (key, {", ".join(_SUPERSEDED_NAMES)})
    VALUES (old.key, {", ".join(value for _, _, value in _SUPERSEDED)})
    ON CONFLICT (key) DO UPDATE SET
    {", ".join(f"{name} = {name} + excluded.{name}" for name in _SUPERSEDED_NAMES)};
END;
"""
_INSERT = (
    f"INSERT INTO outcomes (key, {', '.join(COLUMN_NAMES)}) "
    f"VALUES ({', '.join('?' * (len(COLUMN_NAMES) + 1))}) "
    f"ON CONFLICT (key) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in COLUMN_NAMES)}"
)
_SELECT = (
    f"SELECT key, {', '.join(COLUMN_NAMES)} FROM outcomes "
    "WHERE key IN (SELECT value FROM json_each(?))"
)
_STOP = object()


class Previous(NamedTuple):
    """A row's last outcome as the journal knows it."""

    fingerprint: bytes
    ok: bool
    input_digest: bytes | None
    error_kind: str | None = None

    def stands(self, skip_failed: bool) -> bool:
        """Whether this outcome is kept rather than sent again: an answer always, a failure
        with --skip-failed, a row the run stopped mid-way never."""
        return self.ok or (skip_failed and self.error_kind != INTERRUPTED)


@dataclass(frozen=True, slots=True)
class Superseded:
    """Outcomes replaced by a newer one for their key, summed."""

    keys: int = 0
    times: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unpriced_rows: int = 0

    @property
    def spend(self) -> Spend:
        return Spend(self.cost_usd, self.unpriced_rows)


@dataclass(frozen=True, slots=True)
class Totals:
    """What a checkpoint holds, summed (``batcher status``): its rows' outcomes, and what the
    outcomes they replaced had cost (``superseded``: ``times`` outcomes of ``keys`` rows)."""

    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    failed_by_kind: dict[str, int] = field(default_factory=dict)
    unpriced_rows: int = 0
    superseded: Superseded = field(default_factory=Superseded)

    @property
    def held(self) -> Spend:
        """What the rows' current outcomes cost."""
        return Spend(self.cost_usd, self.unpriced_rows)

    @property
    def spent(self) -> Spend:
        """Everything spent on the job: current outcomes and the ones they replaced."""
        return self.held + self.superseded.spend


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
            _add_new_columns(self._writer)
            self._writer.executescript(_TRIGGER)
            verify(self._writer, path)
            _check_identity(self._writer, path, identity, legacy or {})
            self._reader = connect(path)
        except sqlite3.OperationalError as exc:  # before DatabaseError, its parent
            raise ConfigError(f"{path}: cannot open the checkpoint: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise corrupt(path, str(exc)) from None
        self._inode = os.stat(path).st_ino
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.failure: CheckpointError | None = None
        # Called from the writer thread when it fails, so the run stops sending at once
        # rather than at the next ``record`` (``Stopping.watch``).
        self.on_failure: Callable[[CheckpointError], None] = lambda _failure: None
        self._thread = threading.Thread(target=self._write, name="batcher-journal", daemon=True)
        self._thread.start()

    # -- writing ---------------------------------------------------------------------------

    def record(self, outcome: Outcome) -> Outcome:
        """Queue one row's outcome; it is committed within COMMIT_INTERVAL_S. Returns it as
        stored: itself, or a failed one when a value does not fit (``values.fitted``).

        Raises the writer's failure once it failed: nothing more can be kept."""
        if self.failure is not None:
            raise self.failure
        stored, row = fitted(outcome)
        self._queue.put(row)
        return stored

    def _write(self) -> None:
        try:
            failure = self._write_loop()
        except Exception as exc:  # a thread that died unseen lost every row after it
            failure = _cannot_write(self.path, exc)
        if failure is not None:
            self.failure = failure
            self.on_failure(failure)

    def _write_loop(self) -> CheckpointError | None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return None
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
            with self._writer:
                self._writer.executemany(_INSERT, batch)
            if _moved(self.path, self._inode):
                return _restore(self._writer, self.path)
            if stop:
                return None

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
                "SELECT key, fingerprint, ok, input_digest, error_kind FROM outcomes "
                "WHERE key IN (SELECT value FROM json_each(?))",
                (orjson.dumps(list(keys)).decode(),),
            ).fetchall()
        except sqlite3.Error as exc:
            raise CheckpointError(f"{self.path}: cannot read the checkpoint: {exc}") from None
        return {
            key: Previous(print_, bool(ok), digest, kind) for key, print_, ok, digest, kind in rows
        }


def _check_identity(
    writer: sqlite3.Connection, path: Path, identity: dict[str, str], legacy: Mapping[str, str]
) -> None:
    """Claim a new checkpoint for this job, or check it is this job's (and respell it)."""
    stored = dict(writer.execute("SELECT name, value FROM meta").fetchall())
    if not stored:
        with writer:
            writer.executemany("INSERT INTO meta VALUES (?, ?)", identity.items())
        return
    for name, value in identity.items():
        if name not in stored:
            continue  # a checkpoint older than this part of the identity: claimed below
        if stored.get(name) != value and stored.get(name) != legacy.get(name):
            raise JournalMismatchError(
                f"{path}: this checkpoint belongs to another job "
                f"({name} was {stored.get(name)!r}, now {value!r}); "
                "run with --fresh to replace it, or set output.checkpoint_dir"
            )
    if any(stored.get(name) != value for name, value in identity.items()):
        with writer:
            writer.executemany("REPLACE INTO meta VALUES (?, ?)", identity.items())


def _cannot_write(path: Path, exc: Exception) -> CheckpointError:
    """The writer's failure, in one line naming its cause: free space only when it is that."""
    full = isinstance(exc, sqlite3.Error) and exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_FULL
    cause = str(exc) if isinstance(exc, sqlite3.Error) else f"{type(exc).__name__}: {exc}"
    then = "free space and run again" if full else "run again once that is fixed"
    return CheckpointError(
        f"{path}: cannot write the checkpoint ({shorten(cause, 200)}); the rows committed "
        f"before are kept; {then} to continue"
    )


def _moved(path: Path, inode: int) -> bool:
    """Whether the journal file was deleted or replaced since it was opened.

    SQLite keeps writing to a deleted file through its open descriptor, silently: every
    commit would vanish with the last close.
    """
    try:
        return os.stat(path).st_ino != inode
    except FileNotFoundError:
        return True


def _restore(writer: sqlite3.Connection, path: Path) -> CheckpointError:
    """Copy every committed row from the open (deleted) journal back to its path."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        writer.execute("VACUUM INTO ?", (str(path),))
    except (OSError, sqlite3.Error) as exc:
        return CheckpointError(
            f"{path}: the checkpoint was deleted during the run and could not be "
            f"restored ({exc}); the rows it held will be sent again"
        )
    return CheckpointError(
        f"{path}: the checkpoint was deleted during the run; every committed row "
        "was restored to it; run again to continue"
    )


def _add_new_columns(connection: sqlite3.Connection) -> None:
    """Give a journal written by an older version the columns added since (null in its rows)."""
    present = {row[1] for row in connection.execute("PRAGMA table_info(outcomes)")}
    with connection:
        for column in COLUMNS:
            if column.name not in present:
                connection.execute(f"ALTER TABLE outcomes ADD COLUMN {column.name} {column.sql}")


def insert_outcomes(connection: sqlite3.Connection, outcomes: Iterable[Outcome]) -> None:
    """Write outcomes inside the caller's transaction (batch mode commits them together with
    the state of the batch they came from)."""
    connection.executemany(_INSERT, [as_row(outcome) for outcome in outcomes])


@contextmanager
def reading(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to a checkpoint, checked and closed after use.

    Raises ConfigError when it cannot be opened or read, CheckpointCorruptError when damaged.
    """
    try:
        connection = connect(path, readonly=True)
    except sqlite3.Error as exc:
        raise ConfigError(f"{path}: cannot open the checkpoint: {exc}") from None
    try:
        verify(connection, path)
        yield connection
    except sqlite3.OperationalError as exc:
        raise ConfigError(f"{path}: cannot read the checkpoint: {exc}") from None
    except sqlite3.DatabaseError as exc:
        raise corrupt(path, str(exc)) from None
    finally:
        connection.close()


def read_outcomes(
    connection: sqlite3.Connection, keys: Iterable[Any], key_name: str, key_type: pl.DataType
) -> pl.DataFrame:
    """The stored outcome of each of ``keys`` the journal has: a ``key_name`` column, then
    every journal column with its polars type."""
    rows = connection.execute(_SELECT, (orjson.dumps(list(keys)).decode(),)).fetchall()
    return pl.DataFrame(rows, schema={key_name: key_type, **SCHEMA}, orient="row")


def previous_by_key(outcomes: pl.DataFrame, key_name: str) -> dict[Any, Previous]:
    """What ``read_outcomes`` returned, as the lookup ``Plan.prepare`` takes."""
    return {
        key: Previous(fingerprint, bool(ok), digest, kind)
        for key, fingerprint, ok, digest, kind in zip(
            outcomes.get_column(key_name).to_list(),
            outcomes.get_column("fingerprint").to_list(),
            outcomes.get_column("ok").to_list(),
            outcomes.get_column("input_digest").to_list(),
            outcomes.get_column("error_kind").to_list(),
            strict=True,
        )
    }


def totals(connection: sqlite3.Connection) -> Totals:
    """Rows answered and failed, their tokens and cost, failures by kind; the spend of the
    outcomes they replaced."""
    rows = connection.execute(
        "SELECT ok, error_kind, count(*), total(prompt_tokens), total(completion_tokens), "
        f"total(cost_usd), total({UNPRICED_SQL.format(row='')}) "
        "FROM outcomes GROUP BY ok, error_kind"
    ).fetchall()
    ok = failed = prompt = completion = unpriced = 0
    cost = 0.0
    kinds: dict[str, int] = {}
    for success, kind, count, prompt_tokens, completion_tokens, row_cost, row_unpriced in rows:
        prompt += int(prompt_tokens)
        completion += int(completion_tokens)
        cost += float(row_cost)
        unpriced += int(row_unpriced)
        if success:
            ok += count
        else:
            failed += count
            kinds[kind or "unknown"] = count
    return Totals(ok, failed, prompt, completion, cost, kinds, unpriced, superseded(connection))


def spent(connection: sqlite3.Connection) -> Spend:
    """``totals(connection).spent`` without its grouping: 0.15 s for 1,000,000 rows, against
    1 s (the end of every run asks it)."""
    cost, unpriced = connection.execute(
        "SELECT total(cost_usd), count(*) FILTER (WHERE "
        f"{UNPRICED_SQL.format(row='')}) FROM outcomes"
    ).fetchone()
    return Spend(float(cost), int(unpriced)) + superseded(connection).spend


def superseded(connection: sqlite3.Connection) -> Superseded:
    """The spend of every outcome replaced since the journal was made (none in a journal of
    a version that did not keep it)."""
    exists = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'superseded'"
    ).fetchone()
    if exists is None:
        return Superseded()
    keys, *sums = connection.execute(
        f"SELECT count(*), {', '.join(f'total({name})' for name in _SUPERSEDED_NAMES)} "
        "FROM superseded"
    ).fetchone()
    times, prompt, completion, cost, unpriced = sums
    return Superseded(
        int(keys), int(times), int(prompt), int(completion), float(cost), int(unpriced)
    )


def copy_superseded(connection: sqlite3.Connection, schema: str) -> None:
    """The attached journal ``schema``'s replaced spend into the main one, key by key (a
    shard's journal holds its keys' whole history, so a copy made twice counts once)."""
    exists = connection.execute(
        f"SELECT 1 FROM {schema}.sqlite_master WHERE type = 'table' AND name = 'superseded'"
    ).fetchone()
    if exists is not None:
        connection.execute(
            f"INSERT OR REPLACE INTO main.superseded (key, {', '.join(_SUPERSEDED_NAMES)}) "
            f"SELECT key, {', '.join(_SUPERSEDED_NAMES)} FROM {schema}.superseded"
        )


def answered_samples(path: Path) -> list[tuple[float, float, int, int]]:
    """``(cost_usd, latency_s, prompt_tokens, completion_tokens)`` of every priced answered
    row (estimate --sample)."""
    connection = connect(path, readonly=True)
    try:
        rows = connection.execute(
            "SELECT cost_usd, latency_s, prompt_tokens, completion_tokens FROM outcomes "
            "WHERE ok = 1 AND cost_usd IS NOT NULL"
        ).fetchall()
    finally:
        connection.close()
    return [(cost, latency or 0.0, prompt or 0, out or 0) for cost, latency, prompt, out in rows]
