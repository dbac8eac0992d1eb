"""Whether a batch run still submits, and why it stopped."""

from __future__ import annotations

from dataclasses import dataclass

from batcher.errors import BatcherError


@dataclass(slots=True)
class RunControl:
    """Whether a batch run still submits, and why it stopped; shared by its parts."""

    abort: BatcherError | None = None
    stopped: bool = False

    def stop(self, reason: BatcherError) -> None:
        if self.abort is None:
            self.abort = reason
        self.stopped = True
