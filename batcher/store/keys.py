"""How the checkpoint keys a row: its input key as stored (integers stay integers, anything
else is text), joined by the model asked when the job asks a list of models.

SQLite's integers are signed 64-bit, so a ``UInt64`` key is stored as the signed integer of the
same 64 bits (2**64 - 1 as -1): one to one, exact, and a key under 2**63 keeps the value it had
before. The output's key column comes from the input, never from the journal, so it keeps the
input's values and type. Wider integers (``Int128``) are stored as text."""

from __future__ import annotations

from typing import Any

import polars as pl

# The output column naming the model asked, present when request.model is a list.
REQUEST_MODEL = "request_model"
MODEL_COLUMN = "__request_model"  # its name while the output is rebuilt (inputs may clash)
_SEPARATOR = "\x1f"


_SIGNED = (pl.Int8(), pl.Int16(), pl.Int32(), pl.Int64(), pl.UInt8(), pl.UInt16(), pl.UInt32())


def normalise_keys(column: pl.Series) -> list[Any]:
    """Keys as the journal stores them (see the module's docstring)."""
    if column.dtype in _SIGNED:
        return column.to_list()
    if column.dtype == pl.UInt64():
        return column.reinterpret(signed=True).to_list()
    return column.cast(pl.String).to_list()


def key_expression(column: str, dtype: pl.DataType) -> pl.Expr:
    """The same normalisation as ``normalise_keys``, as a polars expression."""
    expression = pl.col(column)
    if dtype in _SIGNED:
        return expression
    if dtype == pl.UInt64():
        return expression.reinterpret(signed=True)
    return expression.cast(pl.String)


def journal_key(key: Any, model: str, multiple_models: bool) -> Any:
    """The checkpoint key of one row for one model: the row's key, joined by the model when
    request.model is a list (so adding a model leaves the others' rows done)."""
    return f"{key}{_SEPARATOR}{model}" if multiple_models else key


def journal_key_expression(column: str, dtype: pl.DataType, multiple_models: bool) -> pl.Expr:
    """``journal_key`` as a polars expression over rows with a ``MODEL_COLUMN``."""
    expression = key_expression(column, dtype)
    if not multiple_models:
        return expression
    return pl.concat_str([expression.cast(pl.String), pl.lit(_SEPARATOR), pl.col(MODEL_COLUMN)])


def journal_key_type(key_type: pl.DataType, multiple_models: bool) -> pl.DataType:
    """The polars type of journal keys for an input key of ``key_type``."""
    if multiple_models:
        return pl.String()
    if key_type in _SIGNED:
        return key_type
    return pl.Int64() if key_type == pl.UInt64() else pl.String()
