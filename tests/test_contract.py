"""The contract every mode keeps: one job run live, in batch mode and with ``--ray`` gives the
same output, the same exit codes and the same promises (a budget, a second start, an
interrupt). Each test runs once per mode; the ``--ray`` cases are ``ray`` and ``slow``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batcher.cli import main
from batcher.config import load_job
from batcher.reports.status import job_status
from batcher.sim import SimulatorThread
from batcher.store.journal import journal_path
from tests.conftest import SimFactory, reviews, wait_for, write_job

MODES = [
    pytest.param("live", id="live"),
    pytest.param("batch", id="batch"),
    pytest.param("ray", id="ray", marks=[pytest.mark.ray, pytest.mark.slow]),
]
COMPARED = ["id", "response", "prompt_tokens", "completion_tokens", "error"]
CONCURRENCY = 4
MAX_TOKENS = 32  # the job's (write_job's default)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The mode under test; ``--ray`` runs on the session's local cluster in process, and
    puts its shard work under the test's folder."""
    name = str(request.param)
    if name == "ray":
        request.getfixturevalue("ray_cluster")
        monkeypatch.setenv("BATCHER_SCRATCH_DIR", str(tmp_path / "scratch"))
    return name


def sections(mode: str, **extra: Any) -> dict[str, Any]:
    """The job's sections for ``mode``: its concurrency, and batch or shard sizes small
    enough for a test's rows to make several."""
    base: dict[str, Any] = {"limits": {"concurrency": CONCURRENCY}}
    if mode == "batch":
        base |= {"endpoint": {"mode": "batch"}, "batch": {"poll_s": 0.05}}
    if mode == "ray":
        base["ray"] = {"shard_rows": 25, "workers": 2}
    for name, value in extra.items():
        base[name] = base.get(name, {}) | value
    return base


def command(job: Path, mode: str, *more: str) -> list[str]:
    return ["run", str(job), "--quiet", *(["--ray"] if mode == "ray" else []), *more]


def answered(server: SimulatorThread, mode: str) -> Counter[str]:
    """How many times the server answered each prompt (live endpoint or Batch API)."""
    simulator = server.simulator
    assert simulator is not None
    return simulator.batches.answered_by_prompt if mode == "batch" else simulator.answered_by_prompt


def live_output(folder: Path, data: pl.DataFrame) -> pl.DataFrame:
    """What a plain live run of ``data`` writes (its own simulator): the reference."""
    folder.mkdir()
    with SimulatorThread() as server:
        job = write_job(folder, server.url, data=data, limits={"concurrency": CONCURRENCY})
        assert main(["run", str(job), "--quiet"]) == 0
    return pl.read_parquet(folder / "out" / "result.parquet")


def same_rows(got: pl.DataFrame, expected: pl.DataFrame) -> None:
    """Every input row, in input order, with the live run's reply and tokens."""
    assert got.select(COMPARED).equals(expected.select(COMPARED))


def share(mode: str) -> float:
    """What a reply costs in ``mode``, as a share of its list price."""
    return 0.5 if mode == "batch" else 1.0


def subprocess_run(job: Path, mode: str) -> subprocess.Popen[str]:
    """`batcher run` in a real subprocess (a signal needs one), ``--ray`` on a cluster of its
    own, its errors captured."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-m", "batcher", *command(job, mode)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_job_runs_to_the_end_with_the_live_output(
    tmp_path: Path, sim_factory: SimFactory, mode: str
) -> None:
    data = reviews(60)
    expected = live_output(tmp_path / "live", data)
    server = sim_factory()
    job = write_job(tmp_path, server.url, data=data, **sections(mode))
    assert main(command(job, mode)) == 0
    same_rows(pl.read_parquet(tmp_path / "out" / "result.parquet"), expected)
    counts = answered(server, mode)
    assert len(counts) == data.height
    assert set(counts.values()) == {1}


def stopped_line(err: str) -> str:
    """The one line that says why the run stopped (and no command to resume)."""
    assert "Traceback" not in err
    assert "resume with:" not in err  # a rerun at the same cap sends nothing
    stopped = [line for line in err.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1, err
    return stopped[0]


def test_the_budget_is_the_jobs_across_runs_and_a_raised_cap_finishes_it(
    tmp_path: Path, sim_factory: SimFactory, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Capped at a third of what the job costs: exit 3, the job's spend within the cap, in
    one line that says what the job spent of it; two reruns at the same cap send nothing and
    say the same; raised, the cap lets a rerun finish without asking any row twice. Every
    row's prompt is as long as the others: no row fits what another left."""
    data = reviews(150).with_columns(
        pl.format(
            "review number {} says fine things", pl.int_range(150).cast(pl.String).str.zfill(3)
        ).alias("text")
    )
    expected = live_output(tmp_path / "live", data)
    cost = float(expected["cost_usd"].sum()) * share(mode)
    cap = round(cost / 3, 6)
    server = sim_factory(latency_s=0.01)
    job = write_job(tmp_path, server.url, data=data, **sections(mode, limits={"max_cost_usd": cap}))
    capsys.readouterr()
    assert main(command(job, mode)) == 3
    line = stopped_line(capsys.readouterr().err)
    said = re.match(r"stopped: the job has spent \$([0-9.]+) of its limits\.max_cost_usd=", line)
    assert said is not None, line
    assert f"limits.max_cost_usd={cap:g}" in line
    assert "raise limits.max_cost_usd to go on" in line
    output = pl.read_parquet(tmp_path / "out" / "result.parquet")
    status = job_status(load_job(job))
    spent = status.spent.cost_usd
    assert spent == pytest.approx(float(output["cost_usd"].sum()))
    assert float(said.group(1)) == pytest.approx(spent, abs=5e-5)  # printed to 4 places
    assert spent <= cap  # worst cases held in flight: no run crosses it
    assert 0 < status.rows_ok < data.height
    asked = sum(answered(server, mode).values())
    assert asked == status.rows_ok

    for _ in range(2):  # the cap is the job's: the reruns find it spent
        assert main(command(job, mode)) == 3
        again = stopped_line(capsys.readouterr().err)
        assert again.startswith(f"stopped: the job has spent ${spent:.4f} of its "), again
        assert sum(answered(server, mode).values()) == asked  # nothing sent
        assert job_status(load_job(job)).spent.cost_usd == pytest.approx(spent)

    assert main(command(job, mode, "--set", "limits.max_cost_usd=100")) == 0
    same_rows(pl.read_parquet(tmp_path / "out" / "result.parquet"), expected)
    counts = answered(server, mode)
    assert len(counts) == data.height
    assert set(counts.values()) == {1}  # no row was asked twice


def slow_server(sim_factory: SimFactory, mode: str) -> SimulatorThread:
    """A server slow enough to catch a run mid-way: live replies take a while; batches take
    seconds (the second round's two are the time the test has to act in), and a share of
    lines fails its first submission, so the run submits a second round of batches once the
    first is collected."""
    if mode == "batch":
        return sim_factory(batch_delay_s=2.0, batch_fail_share=0.3)
    return sim_factory(latency_s=0.2)


def mid_way(server: SimulatorThread, mode: str) -> bool:
    """Some rows answered and collected, others not yet sent or answered."""
    simulator = server.simulator
    assert simulator is not None
    if mode == "batch":
        return len(simulator.batches.batches) >= 2  # the first round collected, a second sent
    return simulator.answered >= 10


def test_a_second_start_is_refused_and_an_interrupt_keeps_every_answer(
    tmp_path: Path, sim_factory: SimFactory, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """While a run goes on in a subprocess, a second start of the same job (with --fresh)
    exits 2, sends nothing (to a server of its own) and leaves the checkpoint alone; SIGTERM
    then stops the first with exit 3 and one line, the output written, every answer the
    server gave in the checkpoint; a rerun finishes without asking an answered row again."""
    data = reviews(200)
    expected = live_output(tmp_path / "live", data)
    server = slow_server(sim_factory, mode)
    job = write_job(tmp_path, server.url, data=data, **sections(mode))
    first = subprocess_run(job, mode)
    try:
        wait_for(lambda: mid_way(server, mode) or first.poll() is not None, 180)
        assert first.poll() is None, "the first run ended before the test could start another"
        other = sim_factory()
        capsys.readouterr()
        # Even asked to replace the checkpoint, it leaves the first run's alone.
        second = command(job, mode, "--fresh", "--set", f"endpoint.base_url={other.url}")
        journal = journal_path(load_job(job).checkpoint_dir)
        with journal.open("rb") as held:
            assert main(second) == 2
            assert os.path.samestat(os.fstat(held.fileno()), journal.stat())
        err = capsys.readouterr().err
        assert "another run of this job" in err
        assert other.simulator is not None
        assert other.simulator.requests == 0
        assert not other.simulator.batches.batches
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 3, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    reasons = [line for line in lines if line.startswith(("stopped:", "error:"))]
    assert len(reasons) == 1, stderr
    assert reasons[0].startswith("stopped: interrupted by SIGTERM")
    assert lines[-1].startswith(f"resume with: batcher run {job}")
    output = pl.read_parquet(tmp_path / "out" / "result.parquet")
    status = job_status(load_job(job))
    before = answered(server, mode)
    assert 0 < status.rows_ok < data.height
    assert sum(before.values()) == status.rows_ok  # every answer is in the checkpoint
    assert output["response"].is_not_null().sum() == status.rows_ok

    assert main(command(job, mode, "--set", "limits.concurrency=32")) == 0
    same_rows(pl.read_parquet(tmp_path / "out" / "result.parquet"), expected)
    counts = answered(server, mode)
    assert len(counts) == data.height
    assert set(counts.values()) == {1}  # no answered row was asked again


def test_a_mistake_found_by_sending_stops_the_run_after_its_first_rows(
    tmp_path: Path, sim_factory: SimFactory, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every row refused (400, not retried): the first 20 rows tell, in every mode.
    server = sim_factory()
    data = reviews(200).with_columns(("[[sim:400]] " + pl.col("text")).alias("text"))
    job = write_job(tmp_path, server.url, data=data, **sections(mode))
    assert main(command(job, mode)) == 3
    stderr = capsys.readouterr().err
    reasons = [line for line in stderr.splitlines() if line.startswith(("stopped:", "error:"))]
    assert len(reasons) == 1, stderr
    assert reasons[0].startswith("stopped: the first 20 rows sent all failed with http_400")
    simulator = server.simulator
    lines = simulator.batches.lines.line_attempts
    sent = sum(lines.values()) if mode == "batch" else simulator.requests
    # Live: only the first rows are sent. --ray: the shards running (2) each test theirs, and
    # no shard starts after. Batch mode: the rows are in batches before any result comes.
    assert sent == {"live": 20, "ray": 40, "batch": data.height}[mode]
    failed = pl.read_parquet(tmp_path / "out" / "result.parquet")["error"]
    assert failed.str.starts_with("http_400: ").all()
