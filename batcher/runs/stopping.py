"""How a run stops early, in every mode: the first reason wins, dispatching ends at once (a live
run's flow controller grants no place from then on, so no request leaves that was not in
flight), work in flight gets the engine's grace period, and signals are taken note of until
the output is written.

Every stop but one keeps the answers in flight: a signal, a refused key, an account that
cannot pay and the budget all wind down (the server answers what it took, and those replies
were paid for). Only a failed journal abandons them at once, since nothing more can be kept."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import NamedTuple

import anyio
import anyio.from_thread
import anyio.lowlevel

from batcher.errors import BatcherError, CheckpointError, InterruptedRunError
from batcher.flow.controller import FlowController
from batcher.store.journal import Journal


class Interrupt(NamedTuple):
    """How an engine meets a first interrupt: the stop reason, the line printed, and how long
    work in flight may go on."""

    reason: str
    line: str
    grace_s: float


class Stopping:
    """Shared by the shell, its engine's parts (producer, workers, clock, submitter) and the
    signal watcher."""

    def __init__(self, notify: Callable[[str], None]) -> None:
        self.notify = notify
        self.abort: BatcherError | None = None
        self.stopping = False
        self.writing = False  # the output is being written: signals only take note
        self.signalled = False  # a first interrupt was taken: the next one abandons work
        self.dispatch_scope = anyio.CancelScope()
        self.work_scope = anyio.CancelScope()
        self._flow: FlowController | None = None

    def attach(self, flow: FlowController) -> None:
        """The run's flow controller, halted by any stop."""
        self._flow = flow
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
        """Stop at once, requests in flight included (the journal failed: nothing is kept)."""
        self.stop_dispatch(reason)
        self.work_scope.cancel()

    def watch(self, journal: Journal) -> None:
        """Stop at once when the journal's writer fails, not at the next outcome recorded
        (slow replies left new requests going out meanwhile). On the run's event loop."""
        token = anyio.lowlevel.current_token()

        def failed(failure: CheckpointError) -> None:  # in the writer's thread
            try:
                anyio.from_thread.run_sync(self.stop_work, failure, token=token)
            except RuntimeError:  # the event loop is gone: ``close`` reports the failure
                return

        journal.on_failure = failed

    def wind_down(self, reason: BatcherError, grace_s: float) -> None:
        """Stop dispatching; work in flight has ``grace_s`` to finish."""
        self.stop_dispatch(reason)
        self.work_scope.deadline = min(self.work_scope.deadline, anyio.current_time() + grace_s)

    async def watch_signals(self, interrupted: Callable[[str], Interrupt]) -> None:
        """Until cancelled: each SIGINT or SIGTERM is an ``interrupt``."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for received in signals:
                self.interrupt(signal.Signals(received).name, interrupted)

    def interrupt(self, name: str, interrupted: Callable[[str], Interrupt]) -> None:
        """The first interrupt (signal ``name``) winds the run down with the engine's message
        and grace (``interrupted``), a second one abandons work in flight; while the output is
        being written, one only takes note. On the run's event loop (``--ray``'s driver
        interrupts a shard's run through ``runs/ray/shard.py``)."""
        if self.writing:
            if self.abort is None:
                self.abort = InterruptedRunError(f"interrupted by {name}")
            self.notify(f"{name}: the output is being written; it finishes first")
            return
        if self.signalled:
            self.notify("second interrupt: abandoning requests in flight")
            self.work_scope.cancel()
            return  # a later interrupt must not raise mid-write either
        self.signalled = True
        interrupt = interrupted(name)
        self.wind_down(InterruptedRunError(interrupt.reason), interrupt.grace_s)
        self.notify(interrupt.line)
