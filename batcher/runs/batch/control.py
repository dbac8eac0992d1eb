"""Whether a batch run still submits, why it stopped, and the signals that stop it."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from batcher.errors import BatcherError, InterruptedRunError


@dataclass(slots=True)
class RunControl:
    """Whether a batch run still submits, and why it stopped; shared by its parts."""

    abort: BatcherError | None = None
    stopped: bool = False

    def stop(self, reason: BatcherError) -> None:
        if self.abort is None:
            self.abort = reason
        self.stopped = True


async def watch_signals(
    control: RunControl,
    notify: Callable[[str], None],
    running: Callable[[], int],
    source: Path,
    scope: anyio.CancelScope,
) -> None:
    """The first SIGINT or SIGTERM stops a batch run: its batches keep running on the server."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for received in signals:
            name = signal.Signals(received).name
            message = (
                f"interrupted by {name}: {running()} batch(es) keep running on the server and "
                "will be billed; rerun the same command to collect them, or cancel them with "
                f"`batcher cancel {source}`"
            )
            control.stop(InterruptedRunError(message))
            notify(message)
            scope.cancel()
            return
