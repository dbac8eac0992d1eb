"""Whole runs on virtual time: the real live engine against the simulator behind a
``httpx.MockTransport``, both on the event loop's clock.

Run under anyio's trio backend with ``trio.testing.MockClock(autojump_threshold=0)`` (the test
module's ``anyio_backend`` fixture): whenever every task waits, the clock jumps to the earliest
wake-up, so sixteen requests in flight for 200 ms take 200 ms, not 3.2 s, and a minute of
pacing takes a second or two of real time. Everything the run times goes by that clock: the
flow controller, the pacer, retries, replies' latency, the server's limiters and the status
lines.

What runs is ``arun``, whole: the shell (lock, journal, output, summary) and the live
engine's dispatch, with its producer, workers and once-a-second tick, the real flow
controller, sender, row worker and retry policy. Two things are not threads here, or time
would jump while they work: the producer reads the input inline (``RunOptions.offload``),
and the server answers in-process. The journal's writer thread only takes what the workers
queue (no task waits on it until the run closes it), and the output is written after the
last request, so neither can move the clock under a request.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson

from batcher.flow.controller import FlowController
from batcher.runs.context import RunOptions
from batcher.runs.shell import arun
from batcher.runs.summary import RunSummary
from batcher.sim import SimSettings
from batcher.sim.faults import error_parts, fault_for
from batcher.sim.replies import user_text
from batcher.sim.server import Simulator
from bench.pacing import write_job, write_rows

BASE_URL = "http://localhost/v1"  # loopback: no API key asked; nothing connects to it


async def inline(work: Any) -> Any:
    """The producer's blocking read, run on the event loop: the clock cannot move under it."""
    return work()


class RequestStormError(Exception):
    """Far more requests than rows: the run retries without waiting."""


class VirtualServer:
    """The simulator's limits, random 429s, latency, injected 429s and replies, served
    in-process on the event loop's clock: ``transport`` goes where the client's HTTP
    transport would. Other faults (drops, stalls, broken bodies) are the loopback tests'."""

    def __init__(self, settings: SimSettings, *, max_requests: int) -> None:
        self.simulator = Simulator(settings, clock=anyio.current_time)
        self.transport = httpx.MockTransport(self.handle)
        # Requests that take no real time can storm at one virtual instant (retried at once,
        # refused at once) and the clock never moves: this ends such a run, as a failure.
        self.max_requests = max_requests

    async def handle(self, request: httpx.Request) -> httpx.Response:
        simulator = self.simulator
        if simulator.requests >= self.max_requests:
            raise RequestStormError(f"more than {self.max_requests:,} requests: a retry storm")
        simulator.requests += 1
        simulator.in_flight += 1
        simulator.max_in_flight = max(simulator.max_in_flight, simulator.in_flight)
        try:
            body = orjson.loads(request.content)
            messages = body["messages"]
            prompt = user_text(messages)
            simulator.attempts[prompt] += 1
            attempt = simulator.attempts[prompt]
            prompt_tokens = simulator.count_prompt(messages)
            refusal = simulator.refusal(body, prompt_tokens)
            if refusal is not None:
                return self._refused(refusal.message, refusal.retry_after_s)
            latency_s = simulator.latency_s()
            if latency_s:
                await anyio.sleep(latency_s)
            fault = fault_for(simulator.settings, request.content, attempt)
            if fault is not None:
                if fault != "429":
                    raise NotImplementedError(f"fault {fault!r}: served over loopback only")
                simulator.statuses["429"] += 1
                return self._refused("simulated rate limit", simulator.settings.retry_after_s)
            reply = simulator.build_reply(body, prompt, prompt_tokens)
            simulator.count_answer(prompt, reply)
            return httpx.Response(
                200, content=orjson.dumps(reply), headers=simulator.limits.advertised()
            )
        finally:
            simulator.in_flight -= 1

    def _refused(self, message: str, retry_after_s: float | None) -> httpx.Response:
        advertised = self.simulator.limits.advertised()
        content, headers = error_parts(429, "rate_limit_error", message, retry_after_s, advertised)
        return httpx.Response(429, content=content, headers=headers)


@dataclass(frozen=True, slots=True)
class CaseResult:
    """One run's figures, as bench/pacing.py prints them, in virtual seconds."""

    summary: RunSummary
    simulator: Simulator
    limit_per_min: float
    achieved_per_min: float
    elapsed_s: float  # virtual seconds from the start to the end of the run

    @property
    def requests(self) -> int:
        return self.simulator.requests

    @property
    def share_429(self) -> float:
        return self.simulator.statuses["429"] / max(self.simulator.requests, 1)

    @property
    def of_limit(self) -> float:
        return self.achieved_per_min / self.limit_per_min

    @property
    def answered_at(self) -> list[float]:
        return self.simulator.answered_at


def virtual_options(server: VirtualServer, **options: Any) -> RunOptions:
    """Options that run the live engine on the event loop's clock against ``server``."""
    clock = anyio.current_time
    return RunOptions(
        clock=clock,
        transport=server.transport,
        offload=inline,
        flow_factory=partial(FlowController, clock=clock),
        **options,
    )


async def run_job(
    path: Path, settings: SimSettings, *, max_requests: int, **options: Any
) -> tuple[RunSummary, Simulator]:
    """``arun`` of the job at ``path`` (quiet, fresh unless told) on virtual time against a
    simulator set up as ``settings``; the client's jitter is seeded with the simulator's seed."""
    random.seed(settings.seed)  # the retry policy's jitter draws from the global generator
    virtual = VirtualServer(settings, max_requests=max_requests)
    run_options = virtual_options(virtual, **{"quiet": True, "fresh": True, **options})
    return await arun(path, run_options), virtual.simulator


def write_case(folder: Path, rows: int, limits: dict[str, Any]) -> Path:
    """The benchmark's rows and job in ``folder``; the job's path."""
    folder.mkdir(parents=True, exist_ok=True)
    write_rows(rows, folder)
    return write_job(folder, BASE_URL, limits)


async def run_case(
    folder: Path,
    rows: int,
    server: dict[str, Any],
    limits: dict[str, Any],
    *,
    seed: int = 0,
    **options: Any,
) -> CaseResult:
    """One case of bench/pacing.py on virtual time: ``rows`` rows, a simulator set up as
    ``server`` (its random draws, and the client's jitter, seeded with ``seed``), a job
    stating ``limits``."""
    path = write_case(folder, rows, limits)
    started = anyio.current_time()
    summary, simulator = await run_job(
        path, SimSettings(**{**server, "seed": seed}), max_requests=5 * rows, **options
    )
    by_tokens = "tokens_per_minute" in server and "requests_per_minute" not in server
    achieved = simulator.achieved_tps() if by_tokens else simulator.achieved_rps()
    limit = (
        server.get("requests_per_minute")
        or server.get("tokens_per_minute")
        or limits.get("requests_per_minute")
    )
    assert limit is not None, "a case is measured against the server's limit or the job's"
    return CaseResult(
        summary=summary,
        simulator=simulator,
        limit_per_min=float(limit),
        achieved_per_min=achieved * 60,
        elapsed_s=anyio.current_time() - started,
    )
