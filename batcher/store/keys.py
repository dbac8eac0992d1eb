"""How the checkpoint keys a row: its input key as stored (integers stay integers, anything
else is text), joined by the model asked when the job asks a list of models."""

from __future__ import annotations

from typing import Any

import polars as pl

# The output column naming the model asked, present when request.model is a list.
REQUEST_MODEL = "request_model"
MODEL_COLUMN = "__request_model"  # its name while the output is rebuilt (inputs may clash)
_SEPARATOR = "\x1f"


def normalise_keys(column: pl.Series) -> list[Any]:
    """Keys as the journal stores them: integers stay integers, anything else is text."""
    if column.dtype.is_integer():
        return column.to_list()
    return column.cast(pl.String).to_list()


def key_expression(column: str, dtype: pl.DataType) -> pl.Expr:
    """The same normalisation as ``normalise_keys``, as a polars expression."""
    expression = pl.col(column)
    return expression if dtype.is_integer() else expression.cast(pl.String)


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
    return key_type if key_type.is_integer() and not multiple_models else pl.String()
