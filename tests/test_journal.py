"""The journal's shape, unit by unit: every Outcome field round-trips under its own name, and
a journal written before a column existed gains it when opened."""

from __future__ import annotations

import sqlite3
from dataclasses import fields
from pathlib import Path

import polars as pl

from batcher.store.columns import COLUMN_NAMES, Outcome, Usage
from batcher.store.journal import Journal, connect, read_outcomes, totals

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
