"""Flow control end to end over loopback: servers that limit in different ways (tens of seconds).

The cases and their server set-ups are bench/pacing.py's; the benchmark runs them longer and
prints the figures the README quotes.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from batcher.cli import main
from bench.pacing import CASES, pacing_case
from tests.conftest import SimFactory, reviews, write_job

# case: (rows, least share of the limit achieved, most 429s as a share of requests). The floors
# leave room for a busy machine (CI shares two cores with the simulator): what they catch is a
# controller that lets 429s through or settles far under the limit. The figures the issue asks
# for are measured by bench/pacing.py over longer runs and quoted in the README.
TARGETS = {
    "rpm at limit": (600, 0.90, 0.0),
    "tpm at limit": (600, 0.90, 0.0),
    # The first second's 429s (what is in flight when the server's burst runs out) weigh on
    # 600 rows; a controller that did not adapt would see about two thirds refused.
    "rpm 3x adaptive": (600, 0.80, 0.08),
    "tpm 3x adaptive": (600, 0.80, 0.08),
    "no rate, bucket": (1200, 0.70, 0.08),  # 600 rows would be mostly the first minute
    "headers openai": (450, 0.85, 0.02),
    "headers anthropic": (450, 0.85, 0.02),
    "random 8% 429s": (400, 0.60, 1.0),  # the server's own 429s: not ours to avoid
    "2 s replies": (400, 0.85, 0.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TARGETS))
def test_rate_held_against_the_server(tmp_path: Path, case: str) -> None:
    rows, least, most_429 = TARGETS[case]
    server, limits = CASES[case]
    result = pacing_case(rows, server, limits, tmp_path)
    assert result["exit_code"] == 0
    assert result["rows_ok"] == rows
    assert result["share_429"] <= most_429
    assert result["achieved_per_min"] >= least * result["limit_per_min"]


@pytest.mark.slow
def test_random_429s_are_reported_as_noise(tmp_path: Path) -> None:
    server, limits = CASES["random 8% 429s"]
    summary = pacing_case(400, server, limits, tmp_path)["summary"]
    assert summary.flow.noise_share > 0.03
    assert "429s the pace did not cause" in "\n".join(summary.lines())


def test_429s_do_not_use_up_attempts(tmp_path: Path, sim_factory: SimFactory) -> None:
    # Every row is refused its first three attempts with 429; max_attempts is 2.
    server = sim_factory(fail_share=1.0, fail_attempts_min=3, fail_attempts_max=3, faults=("429",))
    job = write_job(tmp_path, server.url, retry={"max_attempts": 2}, limits={"concurrency": 8})
    assert main(["run", str(job), "--quiet"]) == 0
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


def test_status_lines_without_a_terminal_and_a_concurrency_hint(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory(latency_s=0.5)
    job = write_job(
        tmp_path,
        server.url,
        data=reviews(60),
        limits={"concurrency": 2, "requests_per_minute": 600},
    )
    assert main(["run", str(job), "--progress-every", "1"]) == 0  # stderr is not a terminal
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[0:00:")]
    assert len(lines) >= 5
    assert "rate 600/min (job), in flight" in lines[-1]
    assert "(concurrency)" in err
    assert "limits: job 600 requests/min" in err
    assert (
        "hint: concurrency, not the rate, bound this run: raise limits.concurrency (now 2)" in err
    )


def test_simulator_flags_for_flow_control(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--schedule", "10:x"]) == 2
    assert "expected SECONDS:RPM" in capsys.readouterr().err
    assert main(["sim", "--limiter", "leaky"]) == 2
    assert main(["run", "job.yaml", "--progress-every", "-1"]) == 2
    assert "expected seconds (0 or more)" in capsys.readouterr().err
