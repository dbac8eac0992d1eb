"""How a live run stops early: the first reason wins, dispatching ends at once (the flow
controller grants no place from then on, so no request leaves that was not in flight), requests
in flight get a grace period, and signals are taken note of until the output is written."""

from __future__ import annotations

import signal
from collections.abc import Callable

import anyio

from batcher.errors import BatcherError, InterruptedRunError
from batcher.flow.controller import FlowController
from batcher.send.tally import Tally


class Stopping:
    """Shared by a run's producer, workers, clock and signal watcher."""

    def __init__(self, notify: Callable[[str], None], grace_s: float) -> None:
        self.notify = notify
        self.grace_s = grace_s
        self.abort: BatcherError | None = None
        self.stopping = False
        self.writing = False  # the output is being written: signals only take note
        self.dispatch_scope = anyio.CancelScope()
        self.work_scope = anyio.CancelScope()
        self._flow: FlowController | None = None
        self._tally: Tally | None = None

    def attach(self, flow: FlowController, tally: Tally) -> None:
        """The run's flow controller, halted by any stop, and its tally (for the notice)."""
        self._flow, self._tally = flow, tally
        if self.stopping:
            flow.halt()

    def stop_dispatch(self, reason: BatcherError) -> None:
        """Send nothing more, whatever the reason (signal, budget, stall, a failure): workers
        waiting for a place are refused it; the first reason is the one the run reports."""
        if self.abort is None:
            self.abort = reason
        self.stopping = True
        if self._flow is not None:
            self._flow.halt()
        self.dispatch_scope.cancel()

    def stop_work(self, reason: BatcherError) -> None:
        """Stop at once, requests in flight included (the key or the journal failed)."""
        self.stop_dispatch(reason)
        self.work_scope.cancel()

    def wind_down(self, reason: BatcherError) -> None:
        """Stop dispatching; requests in flight have ``grace_s`` to finish."""
        self.stop_dispatch(reason)
        self.work_scope.deadline = anyio.current_time() + self.grace_s

    async def watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for received in signals:
                name = signal.Signals(received).name
                if self.writing:
                    if self.abort is None:
                        self.abort = InterruptedRunError(f"interrupted by {name}")
                    self.notify(f"{name}: the output is being written; it finishes first")
                    continue
                if self.stopping and isinstance(self.abort, InterruptedRunError):
                    self.notify("second interrupt: abandoning requests in flight")
                    self.work_scope.cancel()
                    continue  # keep listening: a later interrupt must not raise mid-write
                self.wind_down(InterruptedRunError(f"interrupted by {name}"))
                self.notify(f"{name}: stopping; {self._in_flight()}")

    def _in_flight(self) -> str:
        """What is left once dispatch ended: the requests in flight, of all that were sent."""
        grace = f"up to {self.grace_s:g} s to finish (interrupt again to skip)"
        if self._flow is None or self._tally is None:
            return f"requests in flight have {grace}"
        return (
            f"nothing more is sent; {self._flow.in_flight:,} requests in flight "
            f"(of {self._tally.requests:,} sent) have {grace}"
        )
