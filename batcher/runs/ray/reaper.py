"""A local cluster dies with the run that started it, SIGKILL included.

Ray's own processes follow a killed driver only in part: the GCS and raylet go, but the
agents the raylet started (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) are reparented
and stay (seen with Ray 2.60). So the driver starts this reaper in a session of its own and
writes to its stdin every process of the cluster as it appears (``pid starttime`` lines). The
pipe's end is the signal: ``done`` before it means the driver shut the cluster down itself;
an end without it means the driver died, and every listed process still running (the same
process: its start time is checked) is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


def start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def descendants(root: int) -> Iterator[int]:
    """Every process under ``root``, found through ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        yield pid
        stack.extend(children.get(pid, []))


class Reaper:
    """The driver's side: ``watch`` the cluster's processes, ``close`` after shutting it down."""

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "batcher.runs.ray.reaper"],
            stdin=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C to the driver's group must not stop it
        )

    def watch(self) -> None:
        """Tell the reaper of the driver's descendants not told before."""
        lines = []
        for pid in descendants(os.getpid()):
            if pid in self._seen or pid == self._process.pid:
                continue
            started = start_time(pid)
            if started is not None:
                self._seen.add(pid)
                lines.append(f"{pid} {started}\n")
        if lines and self._process.stdin is not None:
            self._process.stdin.write("".join(lines).encode())
            self._process.stdin.flush()

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.write(b"done\n")
            self._process.stdin.close()
        self._process.wait()


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    listed: list[tuple[int, str]] = []
    for line in sys.stdin:
        if line.strip() == "done":
            return 0
        pid, started = line.split()
        listed.append((int(pid), started))
    # The driver is gone without shutting its cluster down.
    for pid, started in listed:
        if start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
    return 0


if __name__ == "__main__":
    sys.exit(main())
