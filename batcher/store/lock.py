"""One run per checkpoint: a lock that a second run of the same job meets at once."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

import orjson

from batcher.errors import CheckpointBusyError, ConfigError


class RunLock:
    """One run per checkpoint: an exclusive ``flock`` on ``lock`` in the checkpoint folder.

    The kernel drops the lock when its holder exits, SIGKILL included, so a killed run's
    successor takes it over; the file's text (pid, host, start time) names a live holder.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / "lock"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(
                f"{folder}: cannot write to the checkpoint folder: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(self._fd)
            os.close(self._fd)
            raise CheckpointBusyError(
                f"{folder}: another run of this job is using this checkpoint ({holder}); "
                "wait for it to end or stop it"
            ) from None
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        text = orjson.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text, 0)

    def release(self) -> None:
        os.close(self._fd)  # closing the descriptor drops the flock


def _holder(fd: int) -> str:
    try:
        data = orjson.loads(os.pread(fd, 4096, 0))
        return f"pid {data['pid']} on {data['host']}, started {data['started']}"
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        return "its holder is starting"
