"""Files written whole: a reader, or a run killed mid-write, sees the old file or the new one,
never half of one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_for(target: Path) -> Path:
    """Where ``target`` is written before it is renamed over: beside it (one filesystem, so
    the rename is atomic), named by this process (``remove_stale`` tells a dead writer's)."""
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


@contextmanager
def replacing(target: Path, *, sync: bool = False) -> Iterator[Path]:
    """A temporary path to write ``target`` at; renamed over ``target`` when the block ends
    without an error (after an fsync with ``sync``: the output, which outlives the run),
    removed when it raises."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_for(target)
    try:
        yield temporary
        if sync:
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        # After a fault (disk full, folder gone) cleaning up can fail the same way; the first
        # error is the one to report, and a leftover temporary is removed next time.
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def remove_stale(target: Path) -> None:
    """Delete temporaries of ``target`` left by runs killed mid-write; never a live process's."""
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        pid = stale.name.removeprefix(f".{target.name}.").removesuffix(".tmp")
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
