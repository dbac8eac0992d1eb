"""`batcher cost`: rows, tokens and dollars of any batcher output, grouped, read lazily; and,
from the checkpoint beside it, what the job spent in all, rows asked again included."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from batcher.errors import BatcherError, ConfigError
from batcher.store.columns import unpriced_expression
from batcher.store.journal import Totals, journal_path, reading, totals
from batcher.store.spend import Spend

FIELDS = ("rows", "ok", "failed", "prompt_tokens", "completion_tokens", "cost_usd")
CHECKPOINT_SUFFIX = ".checkpoint"  # the default output.checkpoint_dir: <output>.checkpoint/


@dataclass(frozen=True, slots=True)
class JobSpend:
    """What the checkpoint says the job spent: its rows' outcomes and the ones they replaced."""

    checkpoint: Path
    held: Totals

    def as_json(self) -> dict[str, Any]:
        spent, gone = self.held.spent, self.held.superseded
        return {
            "checkpoint": str(self.checkpoint),
            "cost_usd": spent.cost_usd,
            "unpriced_rows": spent.unpriced_rows,
            "superseded_cost_usd": gone.cost_usd,
            "superseded_unpriced_rows": gone.unpriced_rows,
            "superseded_outcomes": gone.times,
            "superseded_rows": gone.keys,
        }

    def lines(self, output: Spend) -> list[str]:
        gone = self.held.superseded
        parts = [f"this output's rows {output.describe()}"]
        if gone.times:
            parts.append(
                f"earlier outcomes of rows asked again {gone.spend.describe()} "
                f"({gone.times} outcomes of {gone.keys} rows)"
            )
        other = Spend(
            max(self.held.cost_usd - output.cost_usd, 0.0),
            max(self.held.unpriced_rows - output.unpriced_rows, 0),
        )
        if other.cost_usd >= 0.00005 or other.unpriced_rows:
            parts.append(f"rows of the checkpoint not in this output {other.describe()}")
        return [
            f"spent on this job: {self.held.spent.describe()} (from {self.checkpoint})",
            "  " + "; ".join(parts),
        ]


@dataclass(frozen=True, slots=True)
class Ledger:
    by: str
    total: dict[str, Any]
    groups: list[dict[str, Any]]
    job: JobSpend | None = None
    looked_for: Path | None = None  # the checkpoint that was not there
    unread: str | None = None  # why the checkpoint that is there could not be read

    def as_json(self) -> dict[str, Any]:
        job = self.job.as_json() if self.job is not None else None
        return {"total": self.total, "groups": self.groups, "job": job}

    def lines(self) -> list[str]:
        unpriced = self.total["unpriced_rows"] > 0
        fields = [*FIELDS, "unpriced_rows"] if unpriced else list(FIELDS)
        header = [self.by, *fields]
        rows = [[_show(g["key"]), *(_cell(g, f) for f in fields)] for g in self.groups]
        rows.append(["TOTAL", *(_cell(self.total, f) for f in fields)])
        widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]

        def line(cells: list[str]) -> str:
            first = cells[0].ljust(widths[0])
            return "  ".join(
                [first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))]
            )

        rule = "  ".join("-" * w for w in widths)
        table = [line(header), rule, *(line(r) for r in rows[:-1]), rule, line(rows[-1])]
        if unpriced:
            table.append(
                f"cost_usd leaves out {self.total['unpriced_rows']} rows of models without a "
                "price (their cost is unknown); add them under prices: in the job"
            )
        output = Spend(self.total["cost_usd"], self.total["unpriced_rows"])
        if self.job is not None:
            return table + self.job.lines(output)
        where = f" (no {self.looked_for})" if self.looked_for is not None else ""
        where = f" ({self.unread})" if self.unread is not None else where
        return [
            *table,
            f"spent on this job: not known without its checkpoint{where}; the figures above "
            "are the output's rows only, without earlier outcomes of rows asked again",
        ]


def _cell(group: dict[str, Any], name: str) -> str:
    """A figure of the table; a cost that leaves unpriced rows out says so."""
    if name == "cost_usd" and group["unpriced_rows"]:
        return "unknown" if not group["cost_usd"] else f"{group['cost_usd']:.4f}+unknown"
    return _show(group[name])


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "(none)" if value is None else str(value)


def _aggregates(columns: list[str]) -> list[pl.Expr]:
    return [
        pl.len().alias("rows"),
        pl.col("error").is_null().sum().alias("ok"),
        pl.col("error").is_not_null().sum().alias("failed"),
        pl.col("prompt_tokens").sum().alias("prompt_tokens"),
        pl.col("completion_tokens").sum().alias("completion_tokens"),
        pl.col("cost_usd").sum().alias("cost_usd"),
        unpriced_expression(columns).sum().alias("unpriced_rows"),
    ]


def checkpoint_beside(output: str | Path) -> Path:
    """Where the journal of an output with the default ``output.checkpoint_dir`` is."""
    return journal_path(Path(f"{output}{CHECKPOINT_SUFFIX}"))


def read_ledger(path: str | Path, by: str | None = None) -> Ledger:
    """Totals and per-group figures of one output file (or a glob of them), and the job's
    spend from the checkpoint beside it, when it is there.

    Grouped by ``by``; by default by ``request_model`` (the model asked, in the output of a
    model list) when the output has it, else by ``model`` (the model that answered).
    """
    try:
        lazy = pl.scan_parquet(path)
        columns = lazy.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise ConfigError(f"{path}: cannot read output: {str(exc).splitlines()[0]}") from None
    missing = [
        c for c in ("error", "prompt_tokens", "completion_tokens", "cost_usd") if c not in columns
    ]
    if missing:
        raise ConfigError(f"{path}: not a batcher output (no {', '.join(missing)} column)")
    if by is None:
        by = "request_model" if "request_model" in columns else "model"
    if by not in columns:
        raise ConfigError(f"{path}: --by {by}: no such column (columns: {', '.join(columns)})")
    frames = pl.collect_all(
        [
            lazy.select(_aggregates(columns)),
            lazy.group_by(by)
            .agg(_aggregates(columns))
            .sort("cost_usd", descending=True, nulls_last=True),
        ]
    )
    total = frames[0].row(0, named=True)
    groups = [{"key": row.pop(by), **row} for row in frames[1].iter_rows(named=True)]
    checkpoint = checkpoint_beside(path)
    if not checkpoint.is_file():
        return Ledger(by=by, total=total, groups=groups, looked_for=checkpoint)
    try:
        with reading(checkpoint) as connection:
            held = totals(connection)
    except BatcherError as exc:  # damaged or unreadable: the output's own figures still stand
        return Ledger(by=by, total=total, groups=groups, unread=str(exc))
    return Ledger(by=by, total=total, groups=groups, job=JobSpend(checkpoint, held))
