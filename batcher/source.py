"""The input: CSV or Parquet files (or a glob of them) read lazily by polars, in batches."""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from pathlib import Path

import polars as pl

from batcher.errors import ConfigError

ROW_INDEX = "row_index"
_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class Source:
    """One job's input: its files, schema and key column, read in bounded batches."""

    def __init__(self, pattern: str, id_column: str | None) -> None:
        self.pattern = pattern
        self.files = _expand(pattern)
        self.format = _format_of(self.files)
        self.id_column = id_column
        self.key_column = id_column or ROW_INDEX
        try:
            self.schema = self._scan().collect_schema()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise ConfigError(f"{pattern}: cannot read input: {_first_line(exc)}") from None
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

    def _scan(self) -> pl.LazyFrame:
        if self.format == "csv":
            # Inferring from every row would read the whole file before the first batch.
            return pl.scan_csv(self.files, infer_schema_length=10_000)
        return pl.scan_parquet(self.files)

    def frame(self, limit: int | None = None) -> pl.LazyFrame:
        """The input with its key column first, cut to ``limit`` rows."""
        lazy = self._scan()
        if self.id_column is None:
            lazy = lazy.with_row_index(ROW_INDEX).with_columns(pl.col(ROW_INDEX).cast(pl.Int64))
        if limit is not None:
            lazy = lazy.head(limit)
        return lazy

    def count_rows(self, limit: int | None = None) -> int:
        try:
            count = self._scan().select(pl.len()).collect().item()
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
                self._scan()
                .select(
                    column.null_count().alias("nulls"),
                    column.n_unique().alias("unique"),
                    pl.len().alias("total"),
                )
                .collect()
                .row(0)
            )
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise ConfigError(f"{self.pattern}: cannot read input: {_first_line(exc)}") from None
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
        """The key column and ``columns``, in input order, ``batch_rows`` at a time."""
        wanted = [self.key_column, *(c for c in columns if c != self.key_column)]
        lazy = self.frame(limit).select(wanted)
        try:
            yield from lazy.collect_batches(chunk_size=batch_rows, lazy=True)
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise ConfigError(f"{self.pattern}: cannot read input: {_first_line(exc)}") from None


def _expand(pattern: str) -> list[str]:
    if glob.has_magic(pattern):
        files = sorted(glob.glob(pattern, recursive=True))
        if not files:
            raise ConfigError(f"input.path: no file matches {pattern}")
        return files
    if not Path(pattern).is_file():
        raise ConfigError(f"input.path: input file not found: {pattern}")
    return [pattern]


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
