"""The journal's shape, unit by unit: every Outcome field round-trips under its own name, a
journal written before a column existed gains it when opened, and an outcome replaced by a
newer one for its key leaves its spend behind."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import fields, replace
from operator import attrgetter
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import batcher.store.journal as journal_module
from batcher.errors import CheckpointError
from batcher.store.columns import COLUMN_NAMES, INTERRUPTED, Outcome, Usage
from batcher.store.journal import (
    Journal,
    Superseded,
    Totals,
    connect,
    read_outcomes,
    spent,
    totals,
)
from batcher.store.spend import Spend
from batcher.store.values import BAD_REPLY

IDENTITY = {"input": "data.csv", "output": "out.parquet", "key_column": "id"}


def distinct_outcome(key: str) -> Outcome:
    """An outcome whose every field holds a value no other field holds."""
    return Outcome.answered(
        key,
        b"fingerprint-1234",
        response="the response",
        finish_reason="stop",
        usage=Usage("the-model", 11, 22, 33, 4, 0.5),
        latency_s=1.25,
        attempts=3,
        response_id="resp-1",
        extra={"reasoning": "because"},
        input_digest=b"digest-567890123",
    )


def read_back(path: Path, keys: list[str]) -> pl.DataFrame:
    connection = connect(path, readonly=True)
    try:
        return read_outcomes(connection, keys, "key", pl.String())
    finally:
        connection.close()


def test_every_field_round_trips_by_name(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    journal = Journal(path, IDENTITY)
    outcome = distinct_outcome("a")
    journal.record(outcome)
    assert journal.close() is None
    (row,) = read_back(path, ["a"]).iter_rows(named=True)
    expected = {f.name: getattr(outcome, f.name) for f in fields(Outcome)}
    expected["extra"] = '{"reasoning":"because"}'
    expected["ok"] = 1
    assert row == expected


def test_older_journal_gains_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    old = sqlite3.connect(path)
    # As an older version wrote it: without the input_digest column.
    kept = ", ".join(name for name in COLUMN_NAMES if name != "input_digest")
    old.executescript(
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);"
        f"CREATE TABLE outcomes (key PRIMARY KEY NOT NULL, {kept});"
    )
    old.execute("INSERT INTO outcomes (key, fingerprint, ok, attempts) VALUES ('old', x'00', 1, 1)")
    old.commit()
    old.close()
    journal = Journal(path, IDENTITY)
    journal.record(distinct_outcome("new"))
    assert journal.close() is None
    frame = read_back(path, ["old", "new"]).sort("key")
    assert frame.get_column("input_digest").to_list() == [b"digest-567890123", None]


def test_failed_outcome_and_totals(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    journal = Journal(path, IDENTITY)
    journal.record(distinct_outcome("a"))
    failed = Outcome.failed("b", b"f", "http_500", "  server\n  down ", input_digest=None)
    assert failed.error == "http_500: server down"
    assert (failed.ok, failed.attempts, failed.cost_usd) == (False, 0, None)
    journal.record(failed)
    assert journal.close() is None
    connection = connect(path, readonly=True)
    try:
        held = totals(connection)
    finally:
        connection.close()
    assert (held.ok, held.failed, held.prompt_tokens, held.completion_tokens) == (1, 1, 11, 22)
    assert held.cost_usd == 0.5
    assert held.failed_by_kind == {"http_500": 1}


def held_totals(path: Path) -> Totals:
    connection = connect(path, readonly=True)
    try:
        return totals(connection)
    finally:
        connection.close()


def attempt(key: str, cost_usd: float | None, *, ok: bool = True) -> Outcome:
    """One paid outcome of ``key``: 10 tokens in, 2 out, at ``cost_usd`` (None: unpriced)."""
    usage = Usage("a-model", 10, 2, 12, None, cost_usd)
    if not ok:
        return Outcome.failed(
            key, b"f", "finish_reason", "length", input_digest=None, attempts=1, usage=usage
        )
    return Outcome.answered(
        key,
        b"f",
        response="r",
        finish_reason="stop",
        usage=usage,
        latency_s=0.1,
        attempts=1,
        response_id=None,
        extra=None,
        input_digest=None,
    )


def record_all(path: Path, outcomes: list[Outcome]) -> None:
    journal = Journal(path, IDENTITY)
    for outcome in outcomes:
        journal.record(outcome)
    assert journal.close() is None


def test_replaced_outcomes_keep_their_spend_one_row_per_key(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    record_all(path, [attempt("a", 0.25, ok=False), attempt("b", 1.0)])
    # a retried twice (a failure, then a success), b asked again once; c is new.
    record_all(path, [attempt("a", 0.5, ok=False), attempt("b", 2.0), attempt("c", 4.0)])
    record_all(path, [attempt("a", 0.125)])
    held = held_totals(path)
    assert held.cost_usd == 0.125 + 2.0 + 4.0  # the rows as they are now
    gone = held.superseded
    assert (gone.keys, gone.times, gone.cost_usd) == (2, 3, 0.25 + 0.5 + 1.0)
    assert (gone.prompt_tokens, gone.completion_tokens) == (30, 6)
    assert held.spent == Spend(0.25 + 0.5 + 0.125 + 1.0 + 2.0 + 4.0, 0)
    connection = connect(path, readonly=True)
    try:
        stored = connection.execute("SELECT count(*) FROM superseded").fetchone()[0]
    finally:
        connection.close()
    assert stored == 2  # one row per key asked again, however often
    # A column mended in place is not a new outcome: nothing more is counted as replaced.
    writer = sqlite3.connect(path)
    with writer:
        writer.execute("UPDATE outcomes SET ok = 0, error_kind = 'x' WHERE key = 'c'")
    writer.close()
    assert held_totals(path).superseded == gone


def test_unpriced_outcomes_are_counted_not_priced_at_zero(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    never_sent = Outcome.failed("x", b"f", "image_error", "missing", input_digest=None)
    record_all(path, [attempt("a", None), attempt("b", None, ok=False), attempt("c", 1.0)])
    record_all(path, [attempt("a", None), never_sent])
    record_all(path, [Outcome.failed("x", b"f", "image_error", "missing", input_digest=None)])
    held = held_totals(path)
    # Current: a (answered) and b (failed with a paid reply) unpriced; x cost nothing.
    assert held.held == Spend(1.0, 2)
    # The replaced a was unpriced too; a replaced x that was never sent leaves nothing.
    assert (held.superseded.keys, held.superseded.unpriced_rows) == (1, 1)
    assert held.spent == Spend(1.0, 3)
    connection = connect(path, readonly=True)
    try:
        assert spent(connection) == held.spent  # the end of a run's shorter query
    finally:
        connection.close()
    assert not never_sent.unpriced
    assert attempt("a", None).unpriced


def test_older_journal_keeps_spend_from_its_first_replace(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    old = sqlite3.connect(path)
    # As a version before superseded spend wrote it: no table for it, no trigger.
    old.executescript(
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);"
        f"CREATE TABLE outcomes (key PRIMARY KEY NOT NULL, {', '.join(COLUMN_NAMES)});"
    )
    old.execute(
        "INSERT INTO outcomes (key, fingerprint, ok, attempts, cost_usd) "
        "VALUES ('a', x'00', 0, 1, 0.5)"
    )
    old.commit()
    assert held_totals(path).superseded == Superseded()  # read as it is: nothing replaced yet
    old.close()
    record_all(path, [attempt("a", 2.0)])
    held = held_totals(path)
    assert held.superseded.cost_usd == 0.5
    assert held.spent == Spend(2.5, 0)


def answered(key: Any, **values: Any) -> Outcome:
    """A paid answer of ``key`` (10 tokens in, 2 out, $0.5), with ``values`` in its columns."""
    return replace(attempt(key, 0.5), **values)


MISFITS = {
    "object content": ("response", {"text": "hi"}, "is an object, not text"),
    "object id": ("response_id", {"id": 1}, "is an object, not text"),
    "list finish_reason": ("finish_reason", ["stop"], "is a list, not text"),
    "lone surrogate": ("response", "caf\ud800", "is not valid Unicode (a lone surrogate)"),
    "tokens past 64 bits": ("prompt_tokens", 10**20, "is a 67-bit integer, wider than 64 bits"),
    "float tokens": ("completion_tokens", 1e20, "is a float, not an integer"),
    "infinite latency": ("latency_s", float("inf"), "is not a finite number"),
    "NaN cost": ("cost_usd", float("nan"), "is not a finite number"),
    "extra past 64 bits": ("extra", {"n": 2**70}, "cannot be written as JSON"),
    "text key in extra": ("extra", {1: "x"}, "cannot be written as JSON"),
}


@pytest.mark.parametrize(("column", "value", "why"), MISFITS.values(), ids=MISFITS.keys())
def test_a_value_that_does_not_fit_fails_its_row_and_nothing_else(
    tmp_path: Path, column: str, value: Any, why: str
) -> None:
    path = tmp_path / "journal.sqlite"
    journal = Journal(path, IDENTITY)
    journal.record(attempt("before", 1.0))
    stored = journal.record(answered("bad", **{column: value}))
    journal.record(attempt("after", 1.0))
    assert journal.close() is None  # the writer lived, and committed every row
    assert (stored.ok, stored.error_kind) == (False, BAD_REPLY)
    assert (stored.error or "").startswith(f"bad_reply: {column} {why}")
    frame = read_back(path, ["before", "bad", "after"]).sort("key")
    assert frame.get_column("key").to_list() == ["after", "bad", "before"]
    assert frame.get_column("ok").to_list() == [1, 0, 1]
    (bad,) = frame.filter(pl.col("key") == "bad").iter_rows(named=True)
    assert bad[column] is None
    assert bad["error_kind"] == BAD_REPLY
    # What fits is kept: the row's spend still counts.
    kept = {"prompt_tokens": 10, "completion_tokens": 2, "cost_usd": 0.5, "model": "a-model"}
    assert {k: bad[k] for k in kept if k != column} == {
        k: v for k, v in kept.items() if k != column
    }
    assert held_totals(path).failed_by_kind == {BAD_REPLY: 1}


def test_an_interrupted_row_with_a_misfit_stays_interrupted(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite", IDENTITY)
    interrupted = Outcome.failed(
        "a",
        b"f",
        INTERRUPTED,
        "stopped",
        input_digest=None,
        response={"x": 1},  # type: ignore[arg-type]
    )
    stored = journal.record(interrupted)
    assert journal.close() is None
    assert stored.error_kind == INTERRUPTED  # so the next run sends it again
    assert stored.response is None


def test_a_key_that_does_not_fit_stops_the_run(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite", IDENTITY)
    with pytest.raises(CheckpointError, match="row key that is a 65-bit integer"):
        journal.record(attempt(2**64, 1.0))  # type: ignore[arg-type]
    journal.record(attempt("a", 1.0))
    assert journal.close() is None


def test_a_writer_failure_is_reported_at_once_with_its_cause(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    journal = Journal(path, IDENTITY)
    failures: list[CheckpointError] = []
    reported = threading.Event()

    def on_failure(failure: CheckpointError) -> None:
        failures.append(failure)
        reported.set()

    journal.on_failure = on_failure
    journal.record(attempt("a", 1.0))
    other = sqlite3.connect(path)
    with other:  # any fault but a full disk: here the database itself refuses the rows
        other.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON outcomes "
            "BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END"
        )
    other.close()
    journal.record(attempt("b", 1.0))
    assert reported.wait(timeout=30)  # from the writer's thread, before any other record
    (failure,) = failures
    assert "cannot write the checkpoint (refused by a trigger)" in str(failure)
    assert "free space" not in str(failure)
    with pytest.raises(CheckpointError, match="refused by a trigger"):
        journal.record(attempt("c", 1.0))
    assert journal.close() is failure


def test_a_value_past_every_check_still_stops_the_writer_visibly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that meets what no check foresaw (here: checks switched off) reports it."""
    unchecked = attrgetter("key", *COLUMN_NAMES)
    monkeypatch.setattr(journal_module, "fitted", lambda outcome: (outcome, unchecked(outcome)))
    journal = Journal(tmp_path / "journal.sqlite", IDENTITY)
    journal.record(answered("a", prompt_tokens=10**20))
    failure = journal.close()
    assert failure is not None
    assert "OverflowError" in str(failure)
    assert "free space" not in str(failure)
