"""The output Parquet, rebuilt from the input and the journal in batches, written atomically.

A row is in the output when the journal holds an outcome for its key *and* its current
request fingerprint, so an edited prompt never shows a stale answer. The file is written
beside the target and renamed over it, so a reader (or a killed run) never sees half a file.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from batcher.errors import ConfigError, InputError, OutputError
from batcher.rows.plan import MODEL_COLUMN, REQUEST_MODEL, Plan, normalise_keys
from batcher.send.parse import OutputParser
from batcher.store.columns import COLUMN_NAMES, OUTPUT_COLUMNS, SCHEMA, unpriced_expression
from batcher.store.journal import Previous, connect, previous_by_key, read_outcomes, spent
from batcher.store.spend import Spend

_KEY = "__key"
_FINGERPRINT = "__fingerprint"
_POSITION = "__position"
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


def _remove_stale(target: Path) -> None:
    """Delete temporaries left by runs killed mid-write; never a live process's."""
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        pid = stale.name.removeprefix(f".{target.name}.").removesuffix(".tmp")
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLayout:
    """The output's columns for one job, in order, with their types."""

    def __init__(self, plan: Plan, parsed: dict[str, pl.DataType]) -> None:
        request = plan.job.config.request
        self.plan = plan
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
        source = self.plan.source
        names = [source.key_column, *self.plan.keep_columns]
        names += [c.meta.output_name() for c in self.result_columns()[: -len(self.parsed) or None]]
        return names

    def check_input_columns(self) -> None:
        """Input columns written to the output may not take a name the output or the rebuild
        uses: the join would rename or shadow one of them (a kept ``ok`` once miscounted the
        summary). Template columns that are not kept never reach the join, so they may."""
        reserved = {_KEY, _FINGERPRINT, *COLUMN_NAMES}
        reserved.update(c.meta.output_name() for c in self.result_columns())
        key = self.plan.source.key_column
        if key in reserved:
            raise ConfigError(
                f"input.id_column {key!r} has the name of an output column; rename it in the input"
            )
        clashes = [c for c in self.plan.keep_columns if c in reserved]
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
        columns = [pl.col(MODEL_COLUMN).alias(REQUEST_MODEL)] if self.plan.multiple_models else []
        for name in OUTPUT_COLUMNS:
            columns += [pl.col(name), *beside.get(name, ())]
        columns += [
            extra.struct.field("parsed").struct.field(name).alias(name) for name in self.parsed
        ]
        return columns


def layout_for(plan: Plan, parser: OutputParser) -> OutputLayout:
    """The output's layout, checked: no parsed property or kept column takes a name the
    output uses."""
    source = plan.job.source
    layout = OutputLayout(plan, parser.columns)
    clash = set(parser.columns) & set(layout.fixed_names())
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


def write_output(
    plan: Plan, layout: OutputLayout, journal_file: Path, *, batch_rows: int = 20_000
) -> Written:
    """Rebuild the output from the input and the journal (blocking: run in a thread).

    Every answered row is written, ``--limit`` or not: the limit bounds what is sent, and a
    limited rerun must not shrink an output that holds more. An input that fails to read at a
    known row is written up to that row, so every answer before it is kept (and paid for
    once); the rows from it on wait for a fixed input. Raises OutputError on a fault (disk
    full, folder gone or read-only, checkpoint unreadable).
    """
    try:
        try:
            return _write_output(plan, layout, journal_file, None, batch_rows)
        except InputError as exc:
            if exc.row is None:
                raise
            written = _write_output(plan, layout, journal_file, exc.row, batch_rows)
            return replace(written, stopped=exc)
    except (OSError, sqlite3.Error, pl.exceptions.PolarsError) as exc:
        raise OutputError(f"{plan.output_path}: cannot write the output ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    """The cause in a few words: pyarrow's OSErrors carry ``[errno N]`` only in their text."""
    number = exc.errno if isinstance(exc, OSError) else None
    if number is None and (found := _ERRNO.search(str(exc))):
        number = int(found.group(1))
    if number:
        return os.strerror(number)
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _write_output(
    plan: Plan, layout: OutputLayout, journal_file: Path, read_rows: int | None, batch_rows: int
) -> Written:
    source = plan.source
    key = source.key_column
    key_type = source.schema[key] if key in source.schema else pl.Int64()
    target = plan.output_path
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    needed = sorted(set(plan.row_columns) | set(plan.keep_columns))
    limit = plan.limit
    if not journal_file.exists():
        raise FileNotFoundError(2, f"the checkpoint {journal_file} is gone")
    connection = connect(journal_file, readonly=True)
    writer: pq.ParquetWriter | None = None
    rows = ok = failed = unpriced = 0
    cost = 0.0
    offset = 0
    try:
        for batch in source.batches(needed, limit=read_rows, batch_rows=batch_rows):
            frame = _answered(plan, batch, connection, key_type, offset)
            offset += batch.height
            rows += frame.height
            counted = frame if limit is None else frame.filter(pl.col(_POSITION) < limit)
            done = int(counted.get_column("ok").sum() or 0)
            ok += done
            failed += counted.height - done
            cost += float(frame.get_column("cost_usd").sum() or 0.0)
            unpriced += int(frame.select(_UNPRICED.sum()).item())
            table = frame.select(
                pl.col(key), *[pl.col(c) for c in plan.keep_columns], *layout.result_columns()
            ).to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(temporary, table.schema, compression="zstd")
            writer.write_table(table.cast(writer.schema))
        if writer is None:
            empty = _empty_output(plan, layout, key_type)
            writer = pq.ParquetWriter(temporary, empty.schema, compression="zstd")
            writer.write_table(empty)
        writer.close()
        writer = None
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        job = spent(connection)
    finally:
        connection.close()
        # After a fault (disk full, folder gone) cleaning up can fail the same way; the
        # first error is the one to report, and a leftover temporary is removed next time.
        with contextlib.suppress(OSError):
            if writer is not None:
                writer.close()
            temporary.unlink(missing_ok=True)
    return Written(rows, ok, failed, cost, unpriced_rows=unpriced, spent=job)


def _answered(
    plan: Plan,
    batch: pl.DataFrame,
    connection: sqlite3.Connection,
    key_type: pl.DataType,
    offset: int,
) -> pl.DataFrame:
    """The batch's rows (one per model) with a journal outcome for their current fingerprint,
    joined to it; ``_POSITION`` is the input row's position, for ``--limit``."""
    key = plan.source.key_column
    keys = normalise_keys(batch.get_column(key))
    journal_keys = [plan.journal_key(k, m) for k in keys for m in plan.models]
    outcomes = read_outcomes(connection, journal_keys, _KEY, _journal_key_type(plan, key_type))
    prepared = plan.prepare(batch, _constant(previous_by_key(outcomes, _KEY)))
    fingerprints = [item.fingerprint for _, item, _ in prepared]
    # Only what the output keeps meets the journal's columns in the join.
    positioned = batch.select(pl.col(key), *[pl.col(c) for c in plan.keep_columns]).with_columns(
        pl.int_range(offset, offset + batch.height, dtype=pl.Int64).alias(_POSITION)
    )
    return (
        plan.expand(positioned)
        .with_columns(
            plan.journal_key_expression(key, key_type).alias(_KEY),
            pl.Series(_FINGERPRINT, fingerprints, dtype=pl.Binary),
        )
        .join(outcomes, on=_KEY, how="inner", maintain_order="left")
        .filter(pl.col(_FINGERPRINT) == pl.col("fingerprint"))
    )


def _constant(known: dict[Any, Previous]) -> Callable[[list[Any]], dict[Any, Previous]]:
    """A lookup that answers with outcomes already fetched for this batch."""
    return lambda _keys: known


def _journal_key_type(plan: Plan, key_type: pl.DataType) -> pl.DataType:
    return key_type if key_type.is_integer() and not plan.multiple_models else pl.String()


def _empty_output(plan: Plan, layout: OutputLayout, key_type: pl.DataType) -> pa.Table:
    schema = plan.source.schema
    key = plan.source.key_column
    models = {MODEL_COLUMN: pl.String()} if plan.multiple_models else {}
    frame = pl.DataFrame(
        schema={
            key: key_type,
            **{c: schema[c] for c in plan.keep_columns},
            **models,
            **SCHEMA,
        }
    )
    return frame.select(
        pl.col(key), *[pl.col(c) for c in plan.keep_columns], *layout.result_columns()
    ).to_arrow()
