"""The input cut into shards: consecutive rows, in input order, the same cut on every run.

A shard holds ``shard_rows`` rows; Parquet shards end on row-group boundaries (a row group is
the unit a reader fetches, so no group is read by two workers), which makes them at least
``shard_rows`` long unless the input ends first. A shard's rows are read as stored (CSV: text)
and written to a local Parquet file that the shard's run reads as its input, with
``input.dtypes`` applied there as on one machine. Without ``input.id_column`` the key is the
row's position in the whole input, carried into the shard as its ``row_index`` column.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from batcher.errors import ConfigError
from batcher.rows.source import ROW_INDEX
from batcher.runs.ray.storage import filesystem, is_remote


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    offset: int  # the input position of its first row
    rows: int
    # Parquet: (file number, row groups of that file) in order; CSV: empty.
    groups: tuple[tuple[int, tuple[int, ...]], ...] = ()

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


@dataclass(frozen=True, slots=True)
class ShardedInput:
    """The input's files (locations), their format, and the shards cut from them."""

    files: tuple[str, ...]
    format: str  # csv or parquet
    shards: tuple[Shard, ...]

    @property
    def rows(self) -> int:
        return sum(shard.rows for shard in self.shards)


def input_files(location: str) -> tuple[tuple[str, ...], str]:
    """The files an ``input.path`` names (a glob on local disk) and their format."""
    if is_remote(location) or Path(location).is_file():
        files = [location]
    else:
        files = sorted(glob.glob(location, recursive=True)) if glob.has_magic(location) else []
        if not files:
            raise ConfigError(f"input.path: input file not found: {location}")
    suffixes = {PurePosixPath(f).suffix.lower() for f in files}
    if suffixes <= {".parquet", ".pq"}:
        return tuple(files), "parquet"
    if suffixes == {".csv"}:
        return tuple(files), "csv"
    raise ConfigError(f"input.path: {files[0]}: only .csv and .parquet inputs are read")


def cut(location: str, shard_rows: int) -> ShardedInput:
    """The shards of the input at ``location``."""
    files, fmt = input_files(location)
    if fmt == "csv":
        total = int(_scan_csv(files).select(pl.len()).collect().item())
        shards = [
            Shard(index, offset, min(shard_rows, total - offset))
            for index, offset in enumerate(range(0, total, shard_rows))
        ]
        return ShardedInput(files, fmt, tuple(shards))
    shards = []
    offset = rows = 0
    groups: list[tuple[int, list[int]]] = []
    for number, name in enumerate(files):
        metadata = _parquet(name).metadata
        for group in range(metadata.num_row_groups):
            if not groups or groups[-1][0] != number:
                groups.append((number, []))
            groups[-1][1].append(group)
            rows += metadata.row_group(group).num_rows
            if rows >= shard_rows:
                frozen = tuple((n, tuple(g)) for n, g in groups)
                shards.append(Shard(len(shards), offset, rows, frozen))
                offset, rows, groups = offset + rows, 0, []
    if rows:
        frozen = tuple((n, tuple(g)) for n, g in groups)
        shards.append(Shard(len(shards), offset, rows, frozen))
    return ShardedInput(files, fmt, tuple(shards))


def read_shard(sharded: ShardedInput, shard: Shard, id_column: str | None) -> pl.DataFrame:
    """A shard's rows as stored, with the global ``row_index`` when there is no id column."""
    if sharded.format == "csv":
        frame = _scan_csv(sharded.files).slice(shard.offset, shard.rows).collect()
    else:
        tables = [
            _parquet(sharded.files[number]).read_row_groups(list(groups))
            for number, groups in shard.groups
        ]
        frame = pl.DataFrame(pl.from_arrow(pa.concat_tables(tables)))
    if id_column is None:
        positions = pl.int_range(shard.offset, shard.offset + frame.height, dtype=pl.Int64)
        frame = frame.select(positions.alias(ROW_INDEX), pl.all())
    return frame


def _scan_csv(files: tuple[str, ...]) -> pl.LazyFrame:
    return pl.scan_csv(list(files), infer_schema=False, glob=False)


def _parquet(location: str) -> pq.ParquetFile:
    fs, path = filesystem(location)
    return pq.ParquetFile(fs.open_input_file(path))
