"""The end of a cluster run: one output file from the shards' parts, one journal from theirs.

The parts are written by the one-machine output code on consecutive slices of the input, so
their concatenation in shard order is the file one machine writes. The shards' journals are
merged into the job's own checkpoint (when it is on local disk), so ``batcher status`` reads
a cluster run as it reads any other, and a later run on one machine resumes from it.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batcher.errors import OutputError
from batcher.runs.ray import storage
from batcher.runs.ray.shard import JOURNAL, PART
from batcher.store.files import temporary_for
from batcher.store.journal import Journal, connect, copy_superseded, journal_path, reading, spent


def write_parts(parts: Sequence[str], target: str) -> int:
    """Concatenate the parts (locations, in order) into ``target``, whole; the row count."""
    fs, path = storage.filesystem(target)
    local = isinstance(fs, pafs.LocalFileSystem)
    if local:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        written = str(temporary_for(Path(path)))
    else:
        written = path
    writer: pq.ParquetWriter | None = None
    rows = 0
    try:
        for part in parts:
            part_fs, part_path = storage.filesystem(part)
            table = pq.read_table(part_path, filesystem=part_fs)
            if writer is None:
                writer = pq.ParquetWriter(written, table.schema, compression="zstd", filesystem=fs)
            writer.write_table(table.cast(writer.schema))
            rows += table.num_rows
        if writer is not None:
            writer.close()
            writer = None
        if local:
            os.replace(written, path)
    except (OSError, pafs.ArrowException) as exc:
        raise OutputError(f"{target}: cannot write the output ({exc})") from None
    finally:
        if writer is not None:
            writer.close()
        if local:
            Path(written).unlink(missing_ok=True)
    return rows


def part_locations(store: str, names: Sequence[str]) -> list[str]:
    return [storage.join(store, name, PART) for name in names]


def merge_journals(
    checkpoint_dir: Path, identity: dict[str, str], store: str, names: Sequence[str]
) -> Path:
    """Every shard's outcomes, and what the outcomes they replaced cost, into the job's own
    journal; its path."""
    path = journal_path(checkpoint_dir)
    failure = Journal(path, identity).close()  # creates it, or checks it is this job's
    if failure is not None:
        raise failure
    connection = connect(path)
    try:
        with tempfile.TemporaryDirectory() as folder:
            for name in names:
                copy = Path(folder) / f"{name}.sqlite"
                if not storage.download(storage.join(store, name, JOURNAL), copy):
                    continue
                connection.execute("ATTACH DATABASE ? AS shard", (str(copy),))
                try:
                    with connection:
                        connection.execute(
                            "INSERT OR REPLACE INTO main.outcomes SELECT * FROM shard.outcomes"
                        )
                        copy_superseded(connection, "shard")
                finally:
                    connection.execute("DETACH DATABASE shard")
    except sqlite3.Error as exc:
        raise OutputError(f"{path}: cannot merge the shards' checkpoints ({exc})") from None
    finally:
        connection.close()
    return path


def spent_before(checkpoint_dir: Path | None, store: str, names: Sequence[str]) -> float:
    """What the job spent before this run: its shards' journals (each holds every run of its
    rows, asked again included) or, when larger, the job's own (``checkpoint_dir``; None:
    not on local disk), which holds what they held when last merged and any run on one
    machine since. A cap counts from it."""
    shards = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            copy = Path(folder) / f"{name}.sqlite"
            if storage.download(storage.join(store, name, JOURNAL), copy):
                with reading(copy) as connection:
                    shards += spent(connection).cost_usd
    own = 0.0
    if checkpoint_dir is not None and journal_path(checkpoint_dir).exists():
        with reading(journal_path(checkpoint_dir)) as connection:
            own = spent(connection).cost_usd
    return max(shards, own)
