"""`batcher cost`: rows, tokens and dollars of any batcher output, grouped, read lazily."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from batcher.errors import ConfigError

FIELDS = ("rows", "ok", "failed", "prompt_tokens", "completion_tokens", "cost_usd")


@dataclass(frozen=True, slots=True)
class Ledger:
    by: str
    total: dict[str, Any]
    groups: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        return {"total": self.total, "groups": self.groups}

    def lines(self) -> list[str]:
        header = [self.by, *FIELDS]
        rows = [[_show(g["key"]), *(_show(g[f]) for f in FIELDS)] for g in self.groups]
        rows.append(["TOTAL", *(_show(self.total[f]) for f in FIELDS)])
        widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]

        def line(cells: list[str]) -> str:
            first = cells[0].ljust(widths[0])
            return "  ".join(
                [first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))]
            )

        rule = "  ".join("-" * w for w in widths)
        return [line(header), rule, *(line(r) for r in rows[:-1]), rule, line(rows[-1])]


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "(none)" if value is None else str(value)


def _aggregates() -> list[pl.Expr]:
    return [
        pl.len().alias("rows"),
        pl.col("error").is_null().sum().alias("ok"),
        pl.col("error").is_not_null().sum().alias("failed"),
        pl.col("prompt_tokens").sum().alias("prompt_tokens"),
        pl.col("completion_tokens").sum().alias("completion_tokens"),
        pl.col("cost_usd").sum().alias("cost_usd"),
    ]


def read_ledger(path: str | Path, by: str | None = None) -> Ledger:
    """Totals and per-group figures of one output file (or a glob of them).

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
            lazy.select(_aggregates()),
            lazy.group_by(by).agg(_aggregates()).sort("cost_usd", descending=True, nulls_last=True),
        ]
    )
    total = frames[0].row(0, named=True)
    groups = [{"key": row.pop(by), **row} for row in frames[1].iter_rows(named=True)]
    return Ledger(by=by, total=total, groups=groups)
