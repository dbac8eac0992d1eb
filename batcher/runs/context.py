"""What a run is given: the caller's options, and the services the shell builds once and hands
its engine (live, batch). An engine is the one part that differs by mode; everything a run must
do whatever the mode (lock, identity, journal, stop, output, summary) is the shell's."""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import httpx

from batcher.config import LimitsConfig
from batcher.errors import printable
from batcher.flow.controller import FlowController, FlowReport
from batcher.rows.plan import Plan
from batcher.runs.first_rows import FirstRows
from batcher.runs.stopping import Interrupt, Stopping
from batcher.send.budget import Budget, CostBudget, own_budget
from batcher.send.parse import OutputParser
from batcher.send.prices import PriceTable
from batcher.send.tally import Tally
from batcher.store.journal import Journal

GRACE_S = 10.0


def _stderr(message: str) -> None:
    print(printable(message), file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class RunOptions:
    simulate: bool = False
    limit: int | None = None
    fresh: bool = False
    skip_failed: bool = False
    keep_done: bool = False  # keep rows answered before, whatever their request is now
    quiet: bool = False
    prices_path: str | None = None
    positions: frozenset[int] | None = None  # only these row positions (estimate --sample)
    resume_command: str | None = None
    grace_s: float = GRACE_S
    progress_every_s: float = 30.0  # status lines when stderr is not a terminal; 0: none
    cancel: bool = False  # batch mode: cancel the batches in flight instead of submitting
    notify: Callable[[str], None] = _stderr
    # Builds the run's flow controller (--ray: one whose pacing is leased from a shared budget).
    flow_factory: Callable[[LimitsConfig], FlowController] = FlowController
    # Makes the run's dollar budget of its own (--ray: one whose cap is leased from the job's).
    budget_factory: Callable[[Budget], CostBudget] = own_budget
    # What the live engine times its rows and status lines by, sends through, and runs its
    # blocking reads of the input with. Tests on virtual time pass the event loop's clock, an
    # ``httpx.MockTransport`` and an inline call: under a clock that jumps as soon as every
    # task waits, a read in a worker thread would let time jump while it works.
    clock: Callable[[], float] = time.monotonic
    transport: httpx.AsyncBaseTransport | None = None  # None: the one endpoint.transport names
    offload: Callable[[Callable[[], Any]], Awaitable[Any]] = anyio.to_thread.run_sync


@dataclass(frozen=True, slots=True)
class RunContext:
    """The services of one run, built by the shell and passed down to its engine."""

    plan: Plan
    options: RunOptions
    journal: Journal
    stopping: Stopping
    tally: Tally
    parser: OutputParser
    prices: PriceTable  # list prices; batch mode asks for its own with ``for_batch``
    base_url: str
    first_rows: FirstRows  # each settled row goes to it: the test of limits.early_stop_rows
    # What the job spent before this run, as its checkpoint says: limits.max_cost_usd is the
    # job's, so a run may spend only what is left of it.
    spent_before_usd: float = 0.0


class Engine(Protocol):
    """How one mode sends a run's pending rows and records their outcomes in the journal."""

    def interrupted(self, signal_name: str) -> Interrupt:
        """How a first SIGINT or SIGTERM stops this engine."""
        ...

    async def send(self, context: RunContext) -> None:
        """Send until every row is settled or ``context.stopping`` says stop. A stop reason
        goes to ``stopping``; a run failure that leaves no output to write is raised."""
        ...

    def flow_report(self) -> FlowReport | None:
        """What flow control saw, for the summary (None: nothing was paced)."""
        ...
