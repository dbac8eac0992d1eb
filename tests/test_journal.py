"""The journal's shape, unit by unit: every Outcome field round-trips under its own name, a
journal written before a column existed gains it when opened, and an outcome replaced by a
newer one for its key leaves its spend behind."""

from __future__ import annotations

import sqlite3
from dataclasses import fields
from pathlib import Path

import polars as pl

from batcher.store.columns import COLUMN_NAMES, Outcome, Usage
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
