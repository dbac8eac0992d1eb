"""Waits are bounded: whatever numbers a server's headers carry, a run ends (its rows done,
or stopped as a stall with everything committed), never hangs and never shows a traceback.

Whole runs on virtual time (trio's MockClock through anyio, as in ``tests/virtual.py``)
against a hostile server behind ``httpx.MockTransport``. The run's clock ends the run with
``HungError`` once ``NEVER_S`` virtual seconds have passed (the run reads it once a second),
so a run that would wait for ever fails the test instead of hanging it. (Not a deadline
around the run: the clock would jump to it while the run waits on its journal's thread.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import polars as pl
import pytest
from trio.testing import MockClock

from batcher.flow.controller import FlowController
from batcher.runs.context import RunOptions
from batcher.runs.shell import arun
from batcher.runs.summary import RunSummary
from tests.conftest import SimFactory, start, write_job
from tests.fakes import completion
from tests.virtual import BASE_URL, RequestStormError, inline

ROWS = 20
FIRST = "Review k00000:"  # the prompt of the job's first row
NEVER_S = 2 * 3600.0  # virtual seconds: a run still going by then waits for ever


class HungError(Exception):
    """The run went on past ``NEVER_S``: it would have waited for ever."""


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


class HostileServer:
    """Answers every request after 50 ms, with ``headers`` on every reply; the first row's
    first ``refusals`` attempts are refused with ``status`` instead."""

    def __init__(self, headers: dict[str, str], *, status: int = 429, refusals: int = 0) -> None:
        self.headers, self.status, self.refusals = headers, status, refusals
        self.attempts: Counter[str] = Counter()
        self.transport = httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.attempts.total() > 50 * ROWS:
            raise RequestStormError("a retry storm")
        prompt = orjson.loads(request.content)["messages"][-1]["content"]
        self.attempts[prompt] += 1
        await anyio.sleep(0.05)
        if prompt.startswith(FIRST) and self.attempts[prompt] <= self.refusals:
            error = {"error": {"message": "slow down", "type": "rate_limit_error"}}
            return httpx.Response(self.status, content=orjson.dumps(error), headers=self.headers)
        return httpx.Response(
            200, content=orjson.dumps(completion(prompt_tokens=100)), headers=self.headers
        )


def bounded_clock() -> Callable[[], float]:
    """The event loop's clock, which raises ``HungError`` once ``NEVER_S`` have passed."""
    started = anyio.current_time()

    def clock() -> float:
        now = anyio.current_time()
        if now - started > NEVER_S:
            raise HungError(f"still running after {NEVER_S:g} virtual seconds")
        return now

    return clock


async def run_against(job: Path, server: HostileServer) -> tuple[RunSummary, float]:
    """``job``'s run against ``server`` on a bounded virtual clock, and the seconds it took."""
    clock = bounded_clock()
    started = clock()
    options = RunOptions(
        quiet=True,
        clock=clock,
        transport=server.transport,
        offload=inline,
        flow_factory=partial(FlowController, clock=clock),
    )
    summary = await arun(job, options)
    return summary, clock() - started


async def run(
    tmp_path: Path, server: HostileServer, retry: dict[str, Any] | None = None, **limits: Any
) -> tuple[RunSummary, float]:
    """A job of ``ROWS`` rows run against ``server``, and the virtual seconds it took."""
    job = write_job(tmp_path, BASE_URL, limits={"concurrency": 4, **limits}, retry=retry or {})
    return await run_against(job, server)


async def assert_stalled(tmp_path: Path, summary: RunSummary, took_s: float, asked: str) -> None:
    """Stopped as a stall at once, every row answered so far committed: the rerun, against a
    server that answers, sends only the rows left and finishes."""
    assert summary.exit_code == 3
    assert summary.aborted is not None
    assert asked in summary.aborted
    assert "longer than limits.stall_timeout_s=900 s" in summary.aborted
    assert took_s < 30  # not after sitting through the wait, nor the stall timeout
    assert summary.rows_failed == 0
    assert summary.rows_pending >= 1  # the first row, at least, is left for the next run
    polite = HostileServer({})
    again, _ = await run_against(tmp_path / "job.yaml", polite)
    assert again.exit_code == 0
    assert polite.attempts.total() == summary.rows_pending
    assert pl.read_parquet(tmp_path / "out/result.parquet").height == ROWS


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (429, {"Retry-After": "inf"}),
        (429, {"Retry-After": "1e9"}),
        (503, {"Retry-After": "1e9"}),
        (429, {"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}),
        (429, {"retry-after-ms": "1e12"}),
    ],
    ids=["inf", "1e9", "1e9 on a 503", "year 9999", "retry-after-ms 1e12"],
)
async def test_a_retry_after_longer_than_the_stall_timeout_is_a_stall(
    tmp_path: Path, status: int, headers: dict[str, str]
) -> None:
    server = HostileServer(headers, status=status, refusals=1)
    summary, took_s = await run(tmp_path, server)
    await assert_stalled(
        tmp_path, summary, took_s, "the server asked to wait 3,600 s or more (Retry-After)"
    )


@pytest.mark.anyio
async def test_a_retry_after_bounded_below_the_stall_timeout_is_waited(tmp_path: Path) -> None:
    server = HostileServer({"Retry-After": "inf"}, refusals=1)
    summary, took_s = await run(tmp_path, server, stall_timeout_s=7200)
    assert summary.exit_code == 0
    assert summary.rows_ok == ROWS
    assert 3600 <= took_s <= 3600 * 1.1 + 5  # the longest wait a header can ask, jittered


@pytest.mark.anyio
async def test_a_retry_after_of_nan_is_read_as_absent(tmp_path: Path) -> None:
    server = HostileServer({"Retry-After": "nan"}, refusals=3)
    summary, took_s = await run(tmp_path, server)
    assert summary.exit_code == 0
    assert summary.rows_ok == ROWS
    assert server.attempts.total() == ROWS + 3
    assert took_s < 10  # the backoff's own short waits


@pytest.mark.anyio
async def test_a_negative_retry_after_backs_off_instead_of_storming(tmp_path: Path) -> None:
    # The first row is refused for ever: read as "retry at once", -5 would storm the server.
    server = HostileServer({"Retry-After": "-5"}, refusals=10**9)
    summary, took_s = await run(tmp_path, server, {"initial_backoff_s": 1, "max_backoff_s": 60})
    assert summary.exit_code == 3
    assert summary.aborted is not None
    assert "nothing but 429" in summary.aborted
    assert summary.rows_ok == ROWS - 1
    assert 900 <= took_s < 1000
    assert server.attempts[next(p for p in server.attempts if p.startswith(FIRST))] < 100


@pytest.mark.anyio
@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-limit-requests": "0.000001"},
        {
            "x-ratelimit-limit-requests": "0.000001",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "inf",
        },
    ],
    ids=["limit 0.000001", "limit 0.000001, none left, reset inf"],
)
async def test_a_limit_below_one_a_minute_is_ignored_with_a_warning(
    tmp_path: Path, headers: dict[str, str]
) -> None:
    summary, took_s = await run(tmp_path, HostileServer(headers))
    assert summary.exit_code == 0
    assert summary.rows_ok == ROWS
    assert took_s < 10  # unpaced: the header said nothing usable
    warning = (
        "ignored the server's x-ratelimit-limit-requests header: not a limit of 1 a minute or more"
    )
    assert summary.warnings == {warning: ROWS}
    assert f"warning: {warning} ({ROWS}×)" in summary.lines()


@pytest.mark.anyio
async def test_a_reset_of_inf_with_nothing_left_pauses_only_a_slot(tmp_path: Path) -> None:
    headers = {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "inf",
    }
    summary, took_s = await run(tmp_path, HostileServer(headers))
    assert summary.exit_code == 0
    assert summary.rows_ok == ROWS
    assert took_s < 2 * ROWS  # about one request a second, as the limit says


@pytest.mark.anyio
async def test_a_stated_rate_of_one_request_an_hour_is_a_stall(tmp_path: Path) -> None:
    # 1 token a minute is a limit, but a request of 105 tokens then waits 105 minutes.
    server = HostileServer({"x-ratelimit-limit-tokens": "1"})
    summary, took_s = await run(tmp_path, server)
    await assert_stalled(
        tmp_path, summary, took_s, "between requests, at the rate its headers state"
    )


@pytest.mark.anyio
async def test_huge_limits_overflow_nothing(tmp_path: Path) -> None:
    headers = {
        "x-ratelimit-limit-requests": "1e308",
        "x-ratelimit-remaining-requests": "1e308",
        "x-ratelimit-limit-tokens": "9" * 60,
        "x-ratelimit-reset-tokens": "1e308h",
    }
    summary, took_s = await run(tmp_path, HostileServer(headers))
    assert summary.exit_code == 0
    assert summary.rows_ok == ROWS
    assert summary.warnings == {}
    assert took_s < 10


def test_over_loopback_a_long_retry_after_stops_the_command_at_once(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    # The simulator refuses every row's first attempt: Retry-After 1e9, retry-after-ms 1e12.
    server = sim_factory(fail_share=1.0, fail_attempts_max=1, faults=("429",), retry_after_s=1e9)
    job = write_job(tmp_path, server.url, limits={"concurrency": 4})
    run = start(job)
    try:
        _, err = run.communicate(timeout=60)  # on a wait for ever: TimeoutExpired
    finally:
        run.kill()  # a run still waiting is ended (this test's own process, by its id)
    assert run.returncode == 3, err
    assert (
        b"stopped: the server asked to wait 3,600 s or more (Retry-After), longer than "
        b"limits.stall_timeout_s=900 s" in err
    )
    assert b"Traceback" not in err
    server.simulator.settings.fail_share = 0.0
    again = start(job)
    _, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    assert pl.read_parquet(tmp_path / "out/result.parquet").height == ROWS
