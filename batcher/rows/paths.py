"""What a job writes never lands on what it reads: the output and the checkpoint are checked
against the input's files, links resolved, before anything is sent.

The output is rebuilt (overwritten) at the end of every run, so an ``output.path`` that names
the input, or any file that is not an earlier output, would be lost.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from pathlib import Path

from batcher.config import Job
from batcher.errors import ConfigError

# Every Parquet file starts with these bytes: an existing output that does not is someone's
# file (an image, a CSV) that the run would overwrite.
PARQUET_MAGIC = b"PAR1"


def check_paths(job: Job, files: list[str], pattern: str) -> None:
    """Raise ConfigError if the output or the checkpoint folder is an input file (``files``,
    what ``pattern`` matched), if a rerun would read the output as input (a glob matching
    it), or if the output path holds a file that is not Parquet."""
    where = job.source
    output, checkpoint = job.output_path, job.checkpoint_dir
    for name in files:
        if _same(output, Path(name)):
            raise ConfigError(
                f"{where}: output.path: {output} is the input file {name}: the run would "
                "overwrite its input; choose another output.path"
            )
        if _same(checkpoint, Path(name)):
            raise ConfigError(
                f"{where}: output.checkpoint_dir: {checkpoint} is the input file {name}; "
                "choose another folder"
            )
    if glob.has_magic(pattern) and (
        _matches(str(output), pattern) or _matches(os.path.realpath(output), pattern)
    ):
        raise ConfigError(
            f"{where}: output.path: {output} matches input.path {pattern}: a rerun would read "
            "the output as input; choose another output.path"
        )
    if output.is_file() and not _is_parquet(output):
        raise ConfigError(
            f"{where}: output.path: {output} exists and is not a Parquet file: the run would "
            "overwrite it; choose another output.path"
        )


def _same(first: Path, second: Path) -> bool:
    """One file under two names: a link, a ``..`` or a hard link."""
    if os.path.realpath(first) == os.path.realpath(second):
        return True
    try:
        return first.exists() and os.path.samefile(first, second)
    except OSError:
        return False


def _matches(path: str, pattern: str) -> bool:
    """Whether ``glob.glob(pattern, recursive=True)`` would list ``path`` once it exists."""
    if "**" in pattern:
        return fnmatch.fnmatchcase(path, pattern)  # ** crosses folders, and so does fnmatch's *
    parts, wanted = Path(path).parts, Path(pattern).parts
    return len(parts) == len(wanted) and all(
        fnmatch.fnmatchcase(part, want) for part, want in zip(parts, wanted, strict=True)
    )


def _is_parquet(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(len(PARQUET_MAGIC))
    except OSError:
        return True  # unreadable: the output's own check says why, when it writes
    return head in (b"", PARQUET_MAGIC)
