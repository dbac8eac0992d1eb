"""The input: CSV or Parquet files (or a glob of them) read lazily by polars, in batches.

CSV columns are text unless ``input.dtypes`` declares a type: guessing from the first rows
turned ``007`` into ``7``, made ``1`` and ``01`` the same key, and failed on a column whose
values changed type after the guessing window, after rows had been paid for.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from batcher.errors import ConfigError, InputError

ROW_INDEX = "row_index"
_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
# The types input.dtypes can declare (config.InputType), as polars types.
TYPES: dict[str, pl.DataType] = {
    "string": pl.String(),
    "int64": pl.Int64(),
    "float64": pl.Float64(),
    "bool": pl.Boolean(),
    "date": pl.Date(),
}
_BOOLEANS = {"true": True, "false": False, "1": True, "0": False}
_POSITION = "__batcher_position"


class Source:
    """One job's input: its files, schema and key column, read in bounded batches."""

    def __init__(
        self, pattern: str, id_column: str | None, dtypes: Mapping[str, str] | None = None
    ) -> None:
        self.pattern = pattern
        self.files = _expand(pattern)
        self.format = _format_of(self.files)
        self.id_column = id_column
        self.key_column = id_column or ROW_INDEX
        self.dtypes = dict(dtypes or {})
        try:
            self.stored = self.scan().collect_schema()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise ConfigError(f"{pattern}: cannot read input: {_first_line(exc)}") from None
        unknown = [c for c in self.dtypes if c not in self.stored]
        if unknown:
            raise ConfigError(
                f"{pattern}: input.dtypes names column {unknown[0]!r} that the input does not "
                f"have (columns: {', '.join(self.stored.names())})"
            )
        self.schema = pl.Schema(
            {
                name: TYPES[self.dtypes[name]] if name in self.dtypes else dtype
                for name, dtype in self.stored.items()
            }
        )
        if id_column is not None and id_column not in self.schema:
            raise ConfigError(
                f"{pattern}: input.id_column {id_column!r} is not a column of the input "
                f"(columns: {', '.join(self.schema.names())})"
            )
        if id_column is None and ROW_INDEX in self.schema:
            raise ConfigError(
                f"{pattern}: the input already has a {ROW_INDEX!r} column; "
                "name it in input.id_column or rename it"
            )

    @property
    def columns(self) -> list[str]:
        return self.schema.names()

    def scan(self) -> pl.LazyFrame:
        """The input as stored (CSV: every column text); our own glob already ran."""
        if self.format == "csv":
            return pl.scan_csv(self.files, infer_schema=False, glob=False)
        return pl.scan_parquet(self.files, glob=False)

    def typed(self, column: str, *, strict: bool) -> pl.Expr:
        """``column`` converted to its declared type (null where it does not parse if not
        ``strict``)."""
        target = self.dtypes[column]
        expression = pl.col(column)
        if self.stored[column] != pl.String() or target == "string":
            return expression.cast(TYPES[target], strict=strict)
        if target == "bool":
            lowered = expression.str.strip_chars().str.to_lowercase()
            if strict:
                return lowered.replace_strict(_BOOLEANS, return_dtype=pl.Boolean)
            return lowered.replace_strict(_BOOLEANS, default=None, return_dtype=pl.Boolean)
        if target == "date":
            return expression.str.strip_chars().str.to_date("%Y-%m-%d", strict=strict)
        return expression.str.strip_chars().cast(TYPES[target], strict=strict)

    def frame(self, limit: int | None = None) -> pl.LazyFrame:
        """The input, typed, with its key column first, cut to ``limit`` rows."""
        lazy = self.scan()
        if self.dtypes:
            lazy = lazy.with_columns(self.typed(c, strict=True) for c in self.dtypes)
        if self.id_column is None:
            lazy = lazy.with_row_index(ROW_INDEX).with_columns(pl.col(ROW_INDEX).cast(pl.Int64))
        if limit is not None:
            lazy = lazy.head(limit)
        return lazy

    def count_rows(self, limit: int | None = None) -> int:
        try:
            count = self.scan().select(pl.len()).collect().item()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise ConfigError(f"{self.pattern}: cannot read input: {_first_line(exc)}") from None
        return int(count) if limit is None else min(int(count), limit)

    def check_keys(self) -> None:
        """An id_column must be present on every row and unique, or resume cannot work."""
        if self.id_column is None:
            return
        column = pl.col(self.id_column)
        try:
            nulls, unique, total = (
                self.frame()
                .select(
                    column.null_count().alias("nulls"),
                    column.n_unique().alias("unique"),
                    pl.len().alias("total"),
                )
                .collect()
                .row(0)
            )
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise ConfigError(str(self.read_error(exc))) from None
        if nulls:
            raise ConfigError(
                f"{self.pattern}: input.id_column {self.id_column!r} is empty on {nulls} row(s)"
            )
        if unique != total:
            raise ConfigError(
                f"{self.pattern}: input.id_column {self.id_column!r} is not unique "
                f"({total - unique} duplicate value(s))"
            )

    def batches(
        self, columns: Sequence[str], *, limit: int | None = None, batch_rows: int = 5_000
    ) -> Iterator[pl.DataFrame]:
        """The key column and ``columns``, in input order, ``batch_rows`` at a time.

        A read error here comes after the run started, so it is an ``InputError`` naming the
        first bad row and column (or, for a damaged line, how far reading got): rows before it
        can still be sent and written.
        """
        wanted = [self.key_column, *(c for c in columns if c != self.key_column)]
        lazy = self.frame(limit).select(wanted)
        delivered = 0
        try:
            for batch in lazy.collect_batches(chunk_size=batch_rows, lazy=True):
                delivered += batch.height
                yield batch
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise self.read_error(exc, delivered) from None

    def read_error(self, exc: BaseException, delivered: int | None = None) -> InputError:
        """The error to show for a failed read, located to its row and column if it can be;
        ``delivered`` is how many rows a batched read had yielded (None: not batched)."""
        found = _first_bad_value(self)
        # Before the run (not batched) nothing was sent, so there is nothing to resume.
        then = "run again" if delivered is None else "run again to resume"
        if found is None and delivered is None:
            return InputError(f"{self.pattern}: cannot read input: {_first_line(exc)}")
        if found is None:  # a damaged line or file: the rows already read are the good ones
            return InputError(
                f"{self.pattern}: cannot read input after row {delivered}: "
                f"{_first_line(exc)}; fix it and {then}",
                row=delivered,
            )
        position, column, value = found
        return InputError(
            f"{self.pattern}: row {position + 1}, column {column!r}: {value!r} does not parse "
            f"as {self.dtypes[column]} (input.dtypes); fix it and {then}",
            row=position,
            column=column,
        )


def _first_bad_value(source: Source) -> tuple[int, str, Any] | None:
    """The first row and column whose value does not parse as its declared type."""
    first: tuple[int, str, Any] | None = None
    raw = source.scan().with_row_index(_POSITION)
    for column in source.dtypes:
        try:
            found = (
                raw.filter(
                    pl.col(column).is_not_null() & source.typed(column, strict=False).is_null()
                )
                .select(_POSITION, column)
                .head(1)
                .collect()
            )
        except (pl.exceptions.PolarsError, OSError):
            return None
        if found.height and (first is None or found.item(0, 0) < first[0]):
            first = (int(found.item(0, 0)), column, found.item(0, 1))
    return first


def _expand(pattern: str) -> list[str]:
    # An existing file is taken as it is named, `[` and all; only otherwise is it a glob.
    if Path(pattern).is_file():
        return [pattern]
    if glob.has_magic(pattern):
        files = sorted(glob.glob(pattern, recursive=True))
        if not files:
            raise ConfigError(f"input.path: no file matches {pattern}")
        return files
    raise ConfigError(f"input.path: input file not found: {pattern}")


def _format_of(files: list[str]) -> str:
    formats = {_FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in formats:
        raise ConfigError(f"input.path: {files[0]}: only .csv and .parquet inputs are read")
    if len(formats) > 1:
        raise ConfigError("input.path: the glob matches both CSV and Parquet files")
    return formats.pop() or "csv"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
