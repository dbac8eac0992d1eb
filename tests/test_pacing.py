"""Flow control end to end: every case of bench/pacing.py on virtual time, and two short ones
over real loopback.

On virtual time (``tests/virtual.py``) the real live engine runs against the simulator's own
limiters behind a ``httpx.MockTransport``, with trio's ``MockClock(autojump_threshold=0)``: a
minute of pacing at 1,200 requests/min takes under a second of real time, and nothing depends
on how busy the machine is, so the floors are the benchmark's figures (README, "Flow control"),
less a point or two. Where the outcome is statistical (random 429s), several seeds.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from trio.testing import MockClock

from batcher.cli import main
from batcher.sim import SimSettings
from bench.pacing import (
    CASES,
    CHANGE_AT_S,
    RESTORE_AT_S,
    SERVER_RPM,
    STATED_ROWS,
    follow_time,
    pacing_case,
    rate_over_time,
)
from tests.conftest import SimFactory, write_job
from tests.virtual import BASE_URL, CaseResult, run_case, run_job

ROWS = 1200  # the benchmark's


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """Trio, on a clock that jumps to the next wake-up whenever every task waits."""
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


# case: (least share of the limit achieved, most 429s as a share of requests). The benchmark's
# figures for 1,200 rows are in the comments; on virtual time each case gives the same figure
# on every run, within a tenth of a point (trio varies the order of tasks woken together).
TARGETS = {
    "rpm at limit": (0.99, 0.0),  # 100.0 %, no 429
    "rpm 3x adaptive": (0.96, 0.012),  # 97.6 %, 0.83 %
    "tpm at limit": (0.99, 0.0),  # 99.8 %, no 429
    "tpm 3x adaptive": (0.98, 0.015),  # 99.4 %, 1.15 %
    "no rate, bucket": (0.98, 0.03),  # 99.2 %, 2.60 %
    # Above the limit: the server's first window is spent at once, then one window in six.
    "no rate, fixed window": (1.05, 0.07),  # 108.4 %, 6.98 %
    "no rate, long retry-after": (0.97, 0.012),  # 98.8 %, 0.83 %
    "no rate, no retry-after": (0.98, 0.03),  # 99.3 %, 2.52 %
    "headers openai": (0.98, 0.003),  # 99.1 %, 0.08 %
    "headers anthropic": (0.98, 0.003),  # 99.1 %, 0.08 %
    "2 s replies": (0.96, 0.0),  # 97.8 %, no 429
    # 900/min stated in headers, 10 s windows, 50 ms replies, 1,000 rows (STATED_ROWS): before
    # a stated limit was the target, 57.0 % and 0.70 % under either window (a deep cut at the
    # first window's edge); the bucket 99.3 %, 0.10 %.
    "stated openai, bucket": (0.98, 0.005),  # 99.1 %, 0.10 %
    "stated openai, fixed": (0.97, 0.005),  # 98.1 %, 0.10 %
    "stated openai, sliding": (0.97, 0.005),  # 98.1 %, 0.10 %
    "stated anthropic, bucket": (0.98, 0.005),  # 99.1 %, 0.10 %
    "stated anthropic, fixed": (0.97, 0.005),  # 98.1 %, 0.10 %
    "stated anthropic, sliding": (0.97, 0.005),  # 98.1 %, 0.10 %
}


def _check_run(result: CaseResult, rows: int) -> None:
    summary = result.summary
    assert summary.exit_code == 0
    assert summary.rows_ok == rows
    assert summary.rows_failed == 0


@pytest.mark.anyio
@pytest.mark.parametrize("case", list(TARGETS))
async def test_rate_held_against_the_server(tmp_path: Path, case: str) -> None:
    least, most_429 = TARGETS[case]
    server, limits = CASES[case]
    rows = STATED_ROWS if case.startswith("stated ") else ROWS
    result = await run_case(tmp_path, rows, server, limits)
    _check_run(result, rows)
    assert result.share_429 <= most_429, result.simulator.statuses
    assert result.of_limit >= least, f"{result.of_limit:.1%} of the limit"


@pytest.mark.anyio
@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_a_sliding_window_is_found(tmp_path: Path, seed: int) -> None:
    """200 in any 10 s, stated nowhere. Replies take 200 to 250 ms: with every reply taking
    exactly 200 ms and no time spent between them, the whole run moves in lockstep with the
    window's edges (each 200-request burst comes back 10 s later as one), a server no network
    makes. The benchmark: 10.38 % 429s and 110.2 % of the limit in one run (its first burst),
    4.31 % and 90.7 % in another."""
    server, limits = CASES["no rate, sliding window"]
    result = await run_case(tmp_path, ROWS, {**server, "latency_jitter_s": 0.05}, limits, seed=seed)
    _check_run(result, ROWS)
    assert result.share_429 <= 0.04, result.simulator.statuses
    assert result.of_limit >= 0.85, f"{result.of_limit:.1%} of the limit"


@pytest.mark.anyio
async def test_random_429s_are_noise(tmp_path: Path) -> None:
    """8 % of requests refused at random (Retry-After 1 s) at a job rate of 1,200/min, over
    five seeds: every 429 is the server's own, they are judged noise, and the pace stays near
    the job's rate (the benchmark: 84.8 %; attempts are paced, so 92 % at most) instead of
    collapsing to what discovery would make of the 429s."""
    server, limits = CASES["random 8% 429s"]
    shares = []
    for seed in range(5):
        result = await run_case(tmp_path / str(seed), ROWS, server, limits, seed=seed)
        _check_run(result, ROWS)
        statuses = result.simulator.statuses
        assert statuses["429"] == statuses["429 random"]  # none that the pace caused
        assert result.share_429 <= 0.10
        flow = result.summary.flow
        assert flow is not None
        assert flow.noise_share > 0.03
        assert "429s the pace did not cause" in "\n".join(result.summary.lines())
        shares.append(result.of_limit)
    assert min(shares) >= 0.75, shares
    assert statistics.median(shares) >= 0.84, shares


@pytest.mark.anyio
async def test_random_429s_over_a_limit(tmp_path: Path) -> None:
    """The same noise on a bucket of 1,200/min that nobody states, over five seeds: the limit
    is found through the noise (the benchmark: 12.41 % 429s, 89.0 % of the limit). A cut taken
    on noise is sometimes kept (seed 0: half the limit); most runs must not keep one."""
    server, limits = CASES["random 8% + limit"]
    shares = []
    for seed in range(5):
        result = await run_case(tmp_path / str(seed), ROWS, server, limits, seed=seed)
        _check_run(result, ROWS)
        assert result.share_429 <= 0.13, result.simulator.statuses
        shares.append(result.of_limit)
    assert min(shares) >= 0.45, shares
    assert sum(share >= 0.75 for share in shares) >= 4, shares
    assert statistics.median(shares) >= 0.78, shares


@pytest.mark.anyio
async def test_a_limit_that_moves_is_followed(tmp_path: Path) -> None:
    """The server's bucket halves at 30 s and comes back at 60 s: the pace follows it down
    within seconds and back up within the time CUBIC growth takes (the benchmark: 4.6 s down,
    36.6 s up, 1.57 % 429s)."""
    server, limits = CASES["limit halved"]
    rows = 2000  # the benchmark's: the run must outlast the restore
    result = await run_case(tmp_path, rows, server, limits)
    _check_run(result, rows)
    assert result.share_429 <= 0.025, result.simulator.statuses
    points = rate_over_time(result.answered_at)
    down = follow_time(points, CHANGE_AT_S, lambda rate: rate <= 1.1 * SERVER_RPM / 2)
    up = follow_time(points, RESTORE_AT_S, lambda rate: rate >= 0.9 * SERVER_RPM)
    assert down is not None
    assert down <= 6.0
    assert up is not None
    assert up <= 40.0
    # Halved, it is not left far below the new limit either.
    halved = [rate for when, rate in points if CHANGE_AT_S + 10 <= when < RESTORE_AT_S]
    assert statistics.median(halved) >= 0.85 * SERVER_RPM / 2, halved


@pytest.mark.anyio
async def test_status_lines_without_a_terminal_and_a_concurrency_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = {"latency_s": 0.5}
    limits = {"concurrency": 2, "requests_per_minute": 600}
    # stderr is not a terminal: a status line every second.
    result = await run_case(tmp_path, 60, server, limits, quiet=False, progress_every_s=1)
    _check_run(result, 60)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[0:00:")]
    # 60 rows, two at a time, half a second each: 15 s, a line each second.
    assert len(lines) >= 14
    assert lines[0].startswith("[0:00:01] ")
    assert all("rate 600/min (job), in flight" in line for line in lines)
    assert any("in flight 2/2 (concurrency)" in line for line in lines)
    # Concurrency binds: two requests of half a second at a time, 4/s, not the job's 10/s.
    rates = [float(line.split(" req/s")[0].rsplit(" ", 1)[1]) for line in lines[1:]]
    assert statistics.median(rates) == pytest.approx(4.0, abs=0.5), rates
    summary = "\n".join(result.summary.lines())
    assert "limits: job 600 requests/min" in summary
    assert (
        "hint: concurrency, not the rate, bound this run: raise limits.concurrency (now 2)"
        in summary
    )


# Over real loopback, two short cases: what virtual time cannot show is the real client,
# sockets and a server in another thread. The floors leave room for a busy machine.
REAL_TARGETS = {
    "rpm at limit": (0.90, 0.0),
    "no rate, bucket": (0.60, 0.20),  # 150 rows: the opening burst weighs on them
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REAL_TARGETS))
def test_rate_held_over_loopback(tmp_path: Path, case: str) -> None:
    least, most_429 = REAL_TARGETS[case]
    server, limits = CASES[case]
    rows = 150  # 7.5 s at 1,200/min
    result = pacing_case(rows, server, limits, tmp_path)
    assert result["exit_code"] == 0
    assert result["rows_ok"] == rows
    assert result["share_429"] <= most_429
    assert result["achieved_per_min"] >= least * result["limit_per_min"]


@pytest.mark.anyio
async def test_429s_do_not_use_up_attempts(tmp_path: Path) -> None:
    # Every row is refused its first three attempts with 429; max_attempts is 2.
    job = write_job(tmp_path, BASE_URL, retry={"max_attempts": 2}, limits={"concurrency": 8})
    server = SimSettings(fail_share=1.0, fail_attempts_min=3, fail_attempts_max=3, faults=("429",))
    summary, simulator = await run_job(job, server, max_requests=200)
    assert summary.exit_code == 0
    assert summary.rows_ok == 20
    assert simulator.statuses["429"] == 60
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["error"].null_count() == out.height
    assert out["attempts"].unique().to_list() == [4]


def test_a_server_answering_only_429_stops_the_run(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory(random_429_share=1.0, retry_after_s=0.2)
    job = write_job(tmp_path, server.url, limits={"stall_timeout_s": 2, "concurrency": 4})
    assert main(["run", str(job), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "stopped: the server answered nothing but 429" in err
    assert "limits.stall_timeout_s=2" in err
    assert "0 ok, 0 failed, 20 pending of 20" in err
    assert "resume with: batcher run" in err
    # Nothing was lost: once the server answers again, the rerun finishes.
    server.simulator.settings.random_429_share = 0.0
    assert main(["run", str(job), "--quiet"]) == 0


def test_simulator_flags_for_flow_control(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--schedule", "10:x"]) == 2
    assert "expected SECONDS:RPM" in capsys.readouterr().err
    assert main(["sim", "--limiter", "leaky"]) == 2
    assert main(["run", "job.yaml", "--progress-every", "-1"]) == 2
    assert "expected seconds (0 or more)" in capsys.readouterr().err
