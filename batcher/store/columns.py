"""A row's Outcome, and the checkpoint and output columns derived from it: one definition.

Each field of ``Outcome`` after ``key`` is a column of the journal; its SQLite and polars types
come from its Python type, and every one not in ``INTERNAL`` is written to the output, in field
order. A new field (with a default) is a new column in the journal, in a resumed run's older
journal, in the rebuild's read-back and in the output file.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import Any

import polars as pl

from batcher.errors import shorten

# Kept in the journal for resuming and for rebuilding the output, never written to it.
INTERNAL = frozenset({"fingerprint", "ok", "error_kind", "extra", "input_digest"})

# The error kind of a row the run stopped before it was done: never its final outcome, so
# the next run sends it again, --skip-failed or not.
INTERRUPTED = "interrupted"


@dataclass(frozen=True, slots=True)
class Usage:
    """What the replies of one row consumed, summed over its paid attempts."""

    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    cost_usd: float | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """The final result of one row, as the journal stores it (see the module's docstring)."""

    key: Any
    fingerprint: bytes
    ok: bool
    error_kind: str | None = None
    response: str | None = None
    finish_reason: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    cost_usd: float | None = None
    latency_s: float | None = None
    attempts: int = 0
    error: str | None = None
    response_id: str | None = None
    extra: dict[str, Any] | None = None
    input_digest: bytes | None = None

    @property
    def unpriced(self) -> bool:
        """Paid for at a price nobody gave (see ``UNPRICED_SQL``)."""
        return self.cost_usd is None and (
            self.ok
            or self.model is not None
            or self.prompt_tokens is not None
            or self.completion_tokens is not None
        )

    @classmethod
    def answered(
        cls,
        key: Any,
        fingerprint: bytes,
        *,
        response: str | None,
        finish_reason: str | None,
        usage: Usage,
        latency_s: float,
        attempts: int,
        response_id: str | None,
        extra: dict[str, Any] | None,
        input_digest: bytes | None,
    ) -> Outcome:
        return cls(
            key,
            fingerprint,
            ok=True,
            response=response,
            finish_reason=finish_reason,
            model=usage.model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            cached_tokens=usage.cached_tokens,
            cost_usd=usage.cost_usd,
            latency_s=latency_s,
            attempts=attempts,
            response_id=response_id,
            extra=extra,
            input_digest=input_digest,
        )

    @classmethod
    def failed(
        cls,
        key: Any,
        fingerprint: bytes,
        kind: str,
        message: str,
        *,
        input_digest: bytes | None,
        attempts: int = 0,
        latency_s: float = 0.0,
        usage: Usage | None = None,
        response: str | None = None,
        finish_reason: str | None = None,
    ) -> Outcome:
        """A row that failed: after its attempts, or before any (``attempts=0``)."""
        return cls(
            key,
            fingerprint,
            ok=False,
            error_kind=kind,
            response=response,
            finish_reason=finish_reason,
            **(_usage(usage) if usage is not None else {}),
            latency_s=latency_s,
            attempts=attempts,
            error=f"{kind}: {shorten(message)}",
            input_digest=input_digest,
        )


# A row whose cost is unknown: no cost, yet a reply was paid for (every answered row; a failed
# row that kept a reply's model or tokens, e.g. a truncated or unparsable one). A row that
# failed before any reply has no cost either, and cost nothing. The same rule three times:
# ``Outcome.unpriced``, this over a journal row (``{row}`` names its table, "" or "old."),
# and ``unpriced_expression`` over an output file, where success is a null ``error``.
UNPRICED_SQL = (
    "({row}cost_usd IS NULL AND ({row}ok = 1 OR {row}model IS NOT NULL "
    "OR {row}prompt_tokens IS NOT NULL OR {row}completion_tokens IS NOT NULL))"
)


def unpriced_expression(columns: Collection[str]) -> pl.Expr:
    """``UNPRICED_SQL`` over an output file with these ``columns`` (``error`` and
    ``cost_usd`` among them; the others count where present)."""
    paid = pl.col("error").is_null()
    for name in ("model", "prompt_tokens", "completion_tokens"):
        if name in columns:
            paid = paid | pl.col(name).is_not_null()
    return pl.col("cost_usd").is_null() & paid


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "model": usage.model,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cached_tokens": usage.cached_tokens,
        "cost_usd": usage.cost_usd,
    }


@dataclass(frozen=True, slots=True)
class Column:
    """One stored column of the journal."""

    name: str
    sql: str
    dtype: pl.DataType
    json: bool  # a dict, stored as JSON text

    @property
    def output(self) -> bool:
        return self.name not in INTERNAL


# Python type of a field → SQLite type, polars type (ok is stored as 0/1).
_TYPES: dict[type, tuple[str, pl.DataType]] = {
    bool: ("INTEGER", pl.Int64()),
    int: ("INTEGER", pl.Int64()),
    float: ("REAL", pl.Float64()),
    str: ("TEXT", pl.String()),
    bytes: ("BLOB", pl.Binary()),
    dict: ("TEXT", pl.String()),
}


def _column(name: str, annotation: Any) -> Column:
    if isinstance(annotation, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = typing.get_origin(annotation) or annotation
    sql, dtype = _TYPES[base]
    return Column(name, sql, dtype, json=base is dict)


_HINTS = typing.get_type_hints(Outcome)
# Every column but the key, in field order.
COLUMNS = tuple(_column(f.name, _HINTS[f.name]) for f in fields(Outcome) if f.name != "key")
COLUMN_NAMES = tuple(c.name for c in COLUMNS)
OUTPUT_COLUMNS = tuple(c.name for c in COLUMNS if c.output)
# The journal's columns as polars reads them back.
SCHEMA: dict[str, pl.DataType] = {c.name: c.dtype for c in COLUMNS}
