"""The output Parquet, rebuilt from the input and the journal in batches, written atomically.

A row is in the output when the journal holds an outcome for its key that stands for the row
as it is now (the run's predicate, ``OutputRows.current``), so an edited prompt never shows a
stale answer. The file is written beside the target and renamed over it, so a reader (or a
killed run) never sees half a file.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from batcher.config import RequestConfig
from batcher.errors import ConfigError, InputError, OutputError
from batcher.store.columns import COLUMN_NAMES, OUTPUT_COLUMNS, SCHEMA, unpriced_expression
from batcher.store.files import remove_stale, replacing
from batcher.store.journal import Previous, connect, previous_by_key, read_outcomes, spent
from batcher.store.keys import (
    MODEL_COLUMN,
    REQUEST_MODEL,
    journal_key,
    journal_key_expression,
    journal_key_type,
    normalise_keys,
)
from batcher.store.spend import Spend

_KEY = "__key"
_POSITION = "__position"
_CURRENT = "__current"
_ERRNO = re.compile(r"\[errno (\d+)\]")
_UNPRICED = unpriced_expression(COLUMN_NAMES)  # over the journal's columns, as joined


@dataclass(frozen=True, slots=True)
class Written:
    """What the output holds: ``rows`` in all; ``ok`` and ``failed`` among the rows within
    ``--limit`` (all of them without one)."""

    rows: int
    ok: int
    failed: int
    cost_usd: float
    # The input stopped reading at a bad row: the output holds the rows before it.
    stopped: InputError | None = None
    unpriced_rows: int = 0  # rows of the output whose cost is unknown (no price)
    # What the job has spent over all its runs, as its journal tells (see ``Totals.spent``).
    spent: Spend = field(default_factory=Spend)


@dataclass(frozen=True, slots=True)
class OutputRows:
    """The job's rows as the output rebuild reads them. The run builds it from its plan, and
    ``current`` decides which journal outcomes stand, so the store renders no request."""

    key_column: str
    key_type: pl.DataType
    kept_schema: dict[str, pl.DataType]
    keep_columns: list[str]  # input columns the output keeps, in order, the key aside
    models: list[str] | None  # a model list: one output row per input row and model
    read_columns: list[str]  # input columns ``current`` and the output read
    limit: int | None  # --limit: the rows counted as ok or failed
    path: Path
    # (columns, limit, batch_rows) → the input in batches, in order.
    batches: Callable[..., Iterator[pl.DataFrame]]
    # (input batch, its journal outcomes by key) → whether each row's outcome stands, one
    # per row and model in order.
    current: Callable[[pl.DataFrame, dict[Any, Previous]], list[bool]]

    @property
    def multiple_models(self) -> bool:
        return self.models is not None

    def journal_keys(self, batch: pl.DataFrame) -> list[Any]:
        keys = normalise_keys(batch.get_column(self.key_column))
        models = self.models or [""]
        return [journal_key(k, m, self.multiple_models) for k in keys for m in models]

    def expand(self, frame: pl.DataFrame) -> pl.DataFrame:
        """One row per (input row, model) in input order then list order."""
        if self.models is None:
            return frame
        models = pl.DataFrame({MODEL_COLUMN: self.models})
        return frame.join(models, how="cross", maintain_order="left_right")


def check_output_target(job_source: Path, target: Path) -> None:
    """Pre-flight: the output path is not a folder and its folder takes a new file."""
    if target.is_dir():
        raise ConfigError(f"{job_source}: output.path: {target} is a folder, not a file")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}."):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{job_source}: output.path: cannot write to {target.parent}: {exc.strerror}"
        ) from None


class OutputLayout:
    """The output's columns for one job, in order, with their types."""

    def __init__(
        self, rows: OutputRows, parsed: dict[str, pl.DataType], request: RequestConfig
    ) -> None:
        self.rows = rows
        self.parsed = parsed
        self.multiple = (request.n or 1) > 1
        self.streamed = request.stream
        extra: dict[str, pl.DataType] = {"tool_calls": pl.String(), "reasoning": pl.String()}
        if self.multiple:
            extra["responses"] = pl.List(pl.String())
            extra["all_tool_calls"] = pl.List(pl.String())
        if self.streamed:
            extra["ttft_s"] = pl.Float64()
        if parsed:
            extra["parsed"] = pl.Struct(parsed)
        self.extra_type = pl.Struct(extra)

    def fixed_names(self) -> list[str]:
        """Every output column but the parsed ones: a parsed property may not take one."""
        names = [self.rows.key_column, *self.rows.keep_columns]
        names += [c.meta.output_name() for c in self.result_columns()[: -len(self.parsed) or None]]
        return names

    def check_input_columns(self) -> None:
        """Input columns written to the output may not take a name the output or the rebuild
        uses: the join would rename or shadow one of them (a kept ``ok`` once miscounted the
        summary). Template columns that are not kept never reach the join, so they may."""
        reserved = {_KEY, _CURRENT, *COLUMN_NAMES}
        reserved.update(c.meta.output_name() for c in self.result_columns())
        key = self.rows.key_column
        if key in reserved:
            raise ConfigError(
                f"input.id_column {key!r} has the name of an output column; rename it in the input"
            )
        clashes = [c for c in self.rows.keep_columns if c in reserved]
        if clashes:
            names = ", ".join(repr(c) for c in clashes)
            raise ConfigError(
                f"input column(s) {names} have the names of output columns; leave them out "
                "with output.keep_columns or rename them in the input"
            )

    def result_columns(self) -> list[pl.Expr]:
        """The journal's output columns in their order, each followed by the fields of
        ``extra`` that belong beside it, then the parsed properties."""
        extra = pl.col("extra").str.json_decode(self.extra_type)
        beside: dict[str, list[pl.Expr]] = {
            "response": [extra.struct.field("responses")] if self.multiple else [],
            "latency_s": [extra.struct.field("ttft_s")] if self.streamed else [],
            "response_id": [
                extra.struct.field("tool_calls"),
                *(
                    [extra.struct.field("all_tool_calls").alias("tool_calls_all")]
                    if self.multiple
                    else []
                ),
                extra.struct.field("reasoning"),
            ],
        }
        columns = [pl.col(MODEL_COLUMN).alias(REQUEST_MODEL)] if self.rows.multiple_models else []
        for name in OUTPUT_COLUMNS:
            columns += [pl.col(name), *beside.get(name, ())]
        columns += [
            extra.struct.field("parsed").struct.field(name).alias(name) for name in self.parsed
        ]
        return columns


def layout_for(
    rows: OutputRows, parsed: dict[str, pl.DataType], request: RequestConfig, source: Path
) -> OutputLayout:
    """The output's layout, checked: no parsed property (``parsed``: their types) or kept
    column takes a name the output uses; ``source`` is the job file, for messages."""
    layout = OutputLayout(rows, parsed, request)
    clash = set(parsed) & set(layout.fixed_names())
    if clash:
        raise ConfigError(
            f"{source}: output schema properties {', '.join(sorted(clash))} clash with "
            "existing output columns; rename them or drop them from output.keep_columns"
        )
    try:
        layout.check_input_columns()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return layout


def write_output(layout: OutputLayout, journal_file: Path, *, batch_rows: int = 20_000) -> Written:
    """Rebuild the output from the input and the journal (blocking: run in a thread).

    Every answered row is written, ``--limit`` or not: the limit bounds what is sent, and a
    limited rerun must not shrink an output that holds more. An input that fails to read at a
    known row is written up to that row, so every answer before it is kept (and paid for
    once); the rows from it on wait for a fixed input. Raises OutputError on a fault (disk
    full, folder gone or read-only, checkpoint unreadable).
    """
    try:
        try:
            return _write_output(layout, journal_file, None, batch_rows)
        except InputError as exc:
            if exc.row is None:
                raise
            written = _write_output(layout, journal_file, exc.row, batch_rows)
            return replace(written, stopped=exc)
    except (OSError, sqlite3.Error, pl.exceptions.PolarsError) as exc:
        raise OutputError(f"{layout.rows.path}: cannot write the output ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    """The cause in a few words: pyarrow's OSErrors carry ``[errno N]`` only in their text."""
    number = exc.errno if isinstance(exc, OSError) else None
    if number is None and (found := _ERRNO.search(str(exc))):
        number = int(found.group(1))
    if number:
        return os.strerror(number)
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _write_output(
    layout: OutputLayout, journal_file: Path, read_rows: int | None, batch_rows: int
) -> Written:
    rows = layout.rows
    key = rows.key_column
    target = rows.path
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    limit = rows.limit
    if not journal_file.exists():
        raise FileNotFoundError(2, f"the checkpoint {journal_file} is gone")
    connection = connect(journal_file, readonly=True)
    total = ok = failed = unpriced = 0
    cost = 0.0
    offset = 0
    kept = [pl.col(c) for c in rows.keep_columns]
    try:
        with replacing(target, sync=True) as temporary:
            writer: pq.ParquetWriter | None = None
            try:
                for batch in rows.batches(
                    rows.read_columns, limit=read_rows, batch_rows=batch_rows
                ):
                    frame = _answered(rows, batch, connection, offset)
                    offset += batch.height
                    total += frame.height
                    counted = frame if limit is None else frame.filter(pl.col(_POSITION) < limit)
                    done = int(counted.get_column("ok").sum() or 0)
                    ok += done
                    failed += counted.height - done
                    cost += float(frame.get_column("cost_usd").sum() or 0.0)
                    unpriced += int(frame.select(_UNPRICED.sum()).item())
                    table = frame.select(pl.col(key), *kept, *layout.result_columns()).to_arrow()
                    if writer is None:
                        writer = pq.ParquetWriter(temporary, table.schema, compression="zstd")
                    writer.write_table(table.cast(writer.schema))
                if writer is None:
                    empty = _empty_output(layout)
                    writer = pq.ParquetWriter(temporary, empty.schema, compression="zstd")
                    writer.write_table(empty)
                writer.close()
                writer = None
            finally:
                if writer is not None:  # a fault mid-write: the first error is reported
                    with contextlib.suppress(OSError):
                        writer.close()
        job = spent(connection)
    finally:
        connection.close()
    return Written(total, ok, failed, cost, unpriced_rows=unpriced, spent=job)


def _answered(
    rows: OutputRows, batch: pl.DataFrame, connection: sqlite3.Connection, offset: int
) -> pl.DataFrame:
    """The batch's rows (one per model) whose journal outcome stands, joined to it;
    ``_POSITION`` is the input row's position, for ``--limit``."""
    key = rows.key_column
    key_type = journal_key_type(rows.key_type, rows.multiple_models)
    outcomes = read_outcomes(connection, rows.journal_keys(batch), _KEY, key_type)
    current = rows.current(batch, previous_by_key(outcomes, _KEY))
    # Only what the output keeps meets the journal's columns in the join.
    positioned = batch.select(pl.col(key), *[pl.col(c) for c in rows.keep_columns]).with_columns(
        pl.int_range(offset, offset + batch.height, dtype=pl.Int64).alias(_POSITION)
    )
    return (
        rows.expand(positioned)
        .with_columns(
            journal_key_expression(key, rows.key_type, rows.multiple_models).alias(_KEY),
            pl.Series(_CURRENT, current, dtype=pl.Boolean),
        )
        .filter(pl.col(_CURRENT))
        .join(outcomes, on=_KEY, how="inner", maintain_order="left")
    )


def _empty_output(layout: OutputLayout) -> pa.Table:
    rows = layout.rows
    key = rows.key_column
    models = {MODEL_COLUMN: pl.String()} if rows.multiple_models else {}
    frame = pl.DataFrame(
        schema={
            key: rows.key_type,
            **rows.kept_schema,
            **models,
            **SCHEMA,
        }
    )
    return frame.select(
        pl.col(key), *[pl.col(c) for c in rows.keep_columns], *layout.result_columns()
    ).to_arrow()
