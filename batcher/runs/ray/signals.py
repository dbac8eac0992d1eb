"""The driver's interrupts, as on one machine: the first SIGINT or SIGTERM stops starting shards
and winds down the ones running (their requests in flight finish, their parts and journals are
kept), so the output is written from what they answered; a second abandons them. While the
output is being written, a signal only takes note."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from batcher.errors import InterruptedRunError

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DriverSignals:
    """What the driver was told: ``received`` is the first signal's name, read by the dispatch
    loop between waits (a handler may not call into Ray)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.writing = False  # the output is being written: signals only take note

    @contextmanager
    def watching(self) -> Iterator[DriverSignals]:
        """Until the block ends (main thread only: elsewhere, signals are not this run's)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous: dict[int, Any] = {number: signal.getsignal(number) for number in _SIGNALS}
        for number in _SIGNALS:
            signal.signal(number, self._handle)
        try:
            yield self
        finally:
            for kind, handler in previous.items():
                signal.signal(kind, handler)

    def interrupt(self) -> InterruptedRunError | None:
        """The run's stop reason if a signal came, as on one machine."""
        return (
            None
            if self.received is None
            else InterruptedRunError(f"interrupted by {self.received}")
        )

    def _handle(self, number: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name
        elif not self.writing:
            raise KeyboardInterrupt  # a second interrupt: the shards running are abandoned
