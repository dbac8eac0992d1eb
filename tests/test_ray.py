"""`batcher run --ray` on a local Ray cluster: the one-machine output, exact after kills, and on
a local S3-compatible server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batcher.cli import main
from batcher.config import load_job
from batcher.errors import BudgetReachedError, ConfigError
from batcher.runs.ray.reaper import descendants, start_time
from batcher.runs.shell import RunOptions, run
from batcher.runs.summary import RunSummary
from batcher.sim import SimulatorThread
from tests.conftest import TEST_AWS_SECRET, reviews, write_job
from tests.echo_server import EchoServer
from tests.leaks import leaks

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]
TIMING = ["latency_s"]


@pytest.fixture(autouse=True)
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Shard work goes under the test's folder (subprocess drivers inherit it too)."""
    folder = tmp_path / "scratch"
    monkeypatch.setenv("BATCHER_SCRATCH_DIR", str(folder))
    return folder


def run_on_ray(job: Path, overrides: list[str] | None = None, **options: Any) -> RunSummary:
    from batcher.runs.ray.driver import run_on_ray as driver_run

    return driver_run(load_job(job, overrides), RunOptions(**{"quiet": True, **options}))


def one_machine(folder: Path, data: pl.DataFrame, **sections: Any) -> pl.DataFrame:
    """The output a one-machine run of the same job writes (its own simulator), unpaced: a
    job's rate decides when its rows are sent, not what they come back with, and the
    cluster runs that keep a kill mid-run by their rate need not wait for it twice."""
    folder.mkdir()
    limits = {k: v for k, v in sections.get("limits", {}).items() if k != "requests_per_minute"}
    sections = {**sections, "limits": limits}
    with SimulatorThread() as server:
        job = write_job(folder, server.url, data=data, **sections)
        summary = run(job, quiet=True)
    assert summary.rows_ok == data.height
    return pl.read_parquet(folder / "out" / "result.parquet")


def both_ways(
    tmp_path: Path, sim: SimulatorThread, data: pl.DataFrame, **sections: Any
) -> tuple[pl.DataFrame, Path, Path]:
    """The one-machine output of ``data``, and the same job against ``sim`` in its own folder."""
    expected = one_machine(tmp_path / "one", data, **sections)
    folder = tmp_path / "many"
    folder.mkdir()
    return expected, folder, write_job(folder, sim.url, data=data, **sections)


def same_output(got: pl.DataFrame, expected: pl.DataFrame) -> None:
    assert got.columns == expected.columns
    assert got.schema == expected.schema
    assert got.drop(TIMING).equals(expected.drop(TIMING))


def wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_output_equals_one_machine_and_a_rerun_skips_done_shards(
    tmp_path: Path,
    sim_factory: Callable[..., SimulatorThread],
    capsys: pytest.CaptureFixture[str],
    scratch: Path,
) -> None:
    """A CSV without an id column (keys are input positions across shards), cut into five
    shards; status and cost read the result; a rerun sends nothing."""
    data = reviews(110)
    sections: dict[str, Any] = {"input": {"id_column": None}, "ray": {"shard_rows": 25}}
    sim = sim_factory()
    expected, folder, job = both_ways(tmp_path, sim, data, **sections)
    summary = run_on_ray(job)
    assert (summary.rows_ok, summary.rows_failed, summary.requests) == (110, 0, 110)
    output = folder / "out" / "result.parquet"
    same_output(pl.read_parquet(output), expected)
    assert summary.exit_code == 0
    assert scratch.is_dir()
    assert not list(scratch.rglob("*.sqlite"))  # done shards leave nothing on the node
    assert main(["status", str(job)]) == 0
    assert "110 done, 0 failed, 0 pending" in capsys.readouterr().out
    assert main(["cost", str(output)]) == 0
    assert "110" in capsys.readouterr().out

    again = run_on_ray(job)
    assert (again.requests, again.rows_skipped, again.rows_ok) == (0, 110, 110)
    assert sim.simulator is not None
    assert sim.simulator.answered == 110
    same_output(pl.read_parquet(output), expected)


def test_cli_flag_and_a_parquet_input(
    tmp_path: Path, sim_factory: Callable[..., SimulatorThread]
) -> None:
    data = reviews(60)
    sections: dict[str, Any] = {"ray": {"shard_rows": 20, "workers": 2}}
    sim = sim_factory()
    expected, folder, job = both_ways(tmp_path, sim, data, fmt="parquet", **sections)
    assert main(["run", str(job), "--ray", "--quiet"]) == 0
    same_output(pl.read_parquet(folder / "out" / "result.parquet"), expected)


class Background:
    """A cluster run in a thread, with the actors it starts at hand."""

    def __init__(self, job: Path, monkeypatch: pytest.MonkeyPatch, **options: Any) -> None:
        from batcher.runs.ray import driver

        self.workers: list[Any] = []
        self.dispatch: Any = None
        spawn = driver._Dispatch._worker

        def recorded(dispatch: Any) -> Any:
            self.dispatch = dispatch
            self.workers.append(spawn(dispatch))
            return self.workers[-1]

        monkeypatch.setattr(driver._Dispatch, "_worker", recorded)
        self.result: list[RunSummary] = []
        self.thread = threading.Thread(
            target=lambda: self.result.append(run_on_ray(job, **options))
        )
        self.thread.start()

    def join(self) -> RunSummary:
        self.thread.join(120)
        assert self.result, "the run did not end"
        return self.result[0]


def test_a_killed_worker_s_shard_finishes_exact(
    tmp_path: Path, sim_factory: Callable[..., SimulatorThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    rows = 240
    data = reviews(rows)
    sections: dict[str, Any] = {
        "ray": {"shard_rows": 120, "workers": 2},
        "limits": {"requests_per_minute": 4800, "concurrency": 8},
    }
    sim = sim_factory(latency_s=0.02)
    expected, folder, job = both_ways(tmp_path, sim, data, **sections)
    background = Background(job, monkeypatch)
    assert sim.simulator is not None
    simulator = sim.simulator
    wait_for(lambda: simulator.answered >= 60, 60)  # each shard about a quarter done
    ray.kill(background.workers[0])
    summary = background.join()
    assert len(background.workers) == 3  # the dead worker's shard went to a new one
    assert summary.rows_ok == rows
    same_output(pl.read_parquet(folder / "out" / "result.parquet"), expected)
    # At most what was in flight and one journal copy's worth is sent again.
    assert simulator.answered <= rows * 1.15


def test_workers_share_one_budget_even_across_its_restart(
    tmp_path: Path, sim_factory: Callable[..., SimulatorThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four workers, the job at the server's 2,400/min (200 in any sliding 5 s): together
    they keep to it (each pacing itself at the job's rate would send 4×), even with the
    budget actor killed and restarted mid-run (its state restored: see test_lease.py)."""
    import ray

    rows, rpm = 240, 2400
    sim = sim_factory(requests_per_minute=rpm, limiter="sliding", window_s=5, latency_s=0.05)
    job = write_job(
        tmp_path,
        sim.url,
        data=reviews(rows),
        limits={"requests_per_minute": rpm, "concurrency": "auto"},
        ray={"shard_rows": 30, "workers": 4},
    )
    lines: list[str] = []
    background = Background(
        job, monkeypatch, quiet=False, progress_every_s=2.0, notify=lines.append
    )
    assert sim.simulator is not None
    simulator = sim.simulator
    wait_for(lambda: simulator.answered >= 100, 60)
    ray.kill(background.dispatch.budget, no_restart=False)
    summary = background.join()
    assert summary.rows_ok == rows
    status = [line for line in lines if line.startswith("ray: ")]
    assert status, lines
    assert f"requests sent, rate {rpm:,}/min (job)" in status[0]
    assert simulator.statuses["429"] <= 0.03 * simulator.requests
    times = sorted(simulator.answered_at)
    rate = (len(times) - 1) / (times[-1] - times[0]) * 60
    assert 0.8 * rpm <= rate <= 1.05 * rpm


def test_sigkill_of_the_driver_leaves_no_ray_and_a_rerun_is_exact(
    tmp_path: Path, sim_factory: Callable[..., SimulatorThread]
) -> None:
    rows = 300
    data = reviews(rows)
    sections: dict[str, Any] = {
        "ray": {"shard_rows": 100, "workers": 2},
        "limits": {"requests_per_minute": 2400, "concurrency": 8},
    }
    sim = sim_factory(latency_s=0.02)
    expected, folder, job = both_ways(tmp_path, sim, data, **sections)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["BATCHER_API_KEY"] = "test-key"
    driver = subprocess.Popen(
        [sys.executable, "-m", "batcher", "run", str(job), "--ray", "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert sim.simulator is not None
    simulator = sim.simulator
    try:
        wait_for(lambda: simulator.answered >= 45, 120)
        cluster = {pid: start_time(pid) for pid in descendants(driver.pid)}
        assert any(cluster.values())
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert simulator.answered < rows  # killed mid-run

    def cluster_gone() -> bool:
        return all(start_time(pid) != started for pid, started in cluster.items())

    wait_for(cluster_gone, 30)
    # The rate only kept the driver busy until its kill: the rerun goes unpaced.
    summary = run_on_ray(job, ["limits.requests_per_minute=null"])
    assert summary.rows_ok == rows
    same_output(pl.read_parquet(folder / "out" / "result.parquet"), expected)
    assert simulator.answered <= rows * 1.15


def test_input_and_output_on_s3(
    tmp_path: Path,
    sim_factory: Callable[..., SimulatorThread],
    s3_server: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pyarrow.fs as pafs

    for name, value in {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": TEST_AWS_SECRET,
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    data = reviews(50)
    sections: dict[str, Any] = {"ray": {"shard_rows": 20}}
    expected = one_machine(tmp_path / "one", data, fmt="parquet", **sections)
    s3 = pafs.S3FileSystem(
        endpoint_override=s3_server.removeprefix("http://"),
        scheme="http",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    s3.create_dir("jobs")
    local = tmp_path / "data.parquet"
    data.write_parquet(local, row_group_size=10)  # shards of two row groups: 20, 20, 10
    pafs.copy_files(str(local), "jobs/in/data.parquet", destination_filesystem=s3)
    sim = sim_factory()
    folder = tmp_path / "many"
    folder.mkdir()
    job = write_job(
        folder,
        sim.url,
        data=data,
        input={"path": "s3://jobs/in/data.parquet", "id_column": "id"},
        output={"path": "s3://jobs/out/result.parquet", "checkpoint_dir": "s3://jobs/ckpt"},
        **sections,
    )
    summary = run_on_ray(job)
    assert summary.rows_ok == 50
    with s3.open_input_file("jobs/out/result.parquet") as handle:
        got = pl.read_parquet(handle)
    same_output(got, expected)
    assert s3.get_file_info("jobs/ckpt/ray/shard-00002/journal.sqlite").type == pafs.FileType.File
    # An input in object storage is checked like a local one (on its first shard).
    with pytest.raises(ConfigError, match=r"job\.yaml: request\.prompt uses column\(s\) nope"):
        run_on_ray(job, ["request.prompt='Say {{ nope }}'"])


def test_sigterm_interrupts_the_driver_as_on_one_machine(
    tmp_path: Path, sim_factory: Callable[..., SimulatorThread]
) -> None:
    """ray.init puts in handlers that end the driver on the spot; the run's own must hold:
    the shards running wind down, the output is written, exit 3 with the one-machine stop
    line and the command that resumes, and the cluster shut down."""
    sim = sim_factory(latency_s=0.02)
    job = write_job(
        tmp_path,
        sim.url,
        data=reviews(300),
        ray={"shard_rows": 100, "workers": 2},
        limits={"requests_per_minute": 1200, "concurrency": 8},
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "batcher", "run", str(job), "--ray", "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert sim.simulator is not None
    simulator = sim.simulator
    try:
        wait_for(lambda: simulator.answered >= 30, 120)
        cluster = {pid: start_time(pid) for pid in descendants(driver.pid)}
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 3
    lines = err.splitlines()
    assert lines[-2:] == [
        "stopped: interrupted by SIGTERM",
        f"resume with: batcher run {job} --ray --quiet",
    ]
    assert "Traceback" not in err
    assert all(start_time(pid) != started for pid, started in cluster.items())
    answered = pl.read_parquet(tmp_path / "out" / "result.parquet")["response"].is_not_null()
    assert answered.sum() == simulator.answered


def test_a_rerun_keeps_the_spend_of_rows_asked_again(
    tmp_path: Path,
    sim_factory: Callable[..., SimulatorThread],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Truncated rows of two shards, redone with --keep-done: the shards' journals keep what
    the truncated answers cost, and the merged checkpoint says what both runs billed."""
    from tests.test_finish import SHORT_MAX_TOKENS, mixed_reviews

    sim = sim_factory()
    job = write_job(
        tmp_path,
        sim.url,
        data=mixed_reviews(40),
        request={"max_tokens": SHORT_MAX_TOKENS},
        output={"fail_on_finish": ["length"]},
        ray={"shard_rows": 20},
    )
    first = run_on_ray(job)
    assert first.rows_failed == 20
    second = run_on_ray(job, ["request.max_tokens=64"], keep_done=True)
    assert (second.rows_ok, second.requests) == (40, 20)
    billed = first.cost_usd + second.cost_usd
    assert second.job_cost_usd == pytest.approx(billed)
    assert second.output_cost_usd < billed
    capsys.readouterr()
    assert main(["status", str(job)]) == 0
    assert f"spent on this job ${billed:.4f}\n" in capsys.readouterr().out


def test_one_dollar_cap_for_the_whole_job(
    tmp_path: Path,
    sim_factory: Callable[..., SimulatorThread],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """1,200 rows in 12 shards of 100 on 4 workers, capped at $0.05: no shard alone reaches
    the cap (each costs about $0.011), the job does. It stops there, within the cap, exit 3,
    with the budget's message (no resume command: at that cap a rerun sends nothing);
    raised, the cap lets a rerun finish the rest."""
    rows, cap, concurrency = 1200, 0.05, 8
    sim = sim_factory(latency_s=0.02)
    job = write_job(
        tmp_path,
        sim.url,
        data=reviews(rows),
        limits={"max_cost_usd": cap, "concurrency": concurrency},
        ray={"shard_rows": 100, "workers": 4},
    )
    assert main(["run", str(job), "--ray", "--progress-every", "0.5"]) == 3
    err = capsys.readouterr().err
    output = pl.read_parquet(tmp_path / "out" / "result.parquet")
    spent = float(output["cost_usd"].sum())
    assert spent <= cap
    assert spent >= cap / 2  # it spent the budget, it did not stop at once
    assert 0 < output["response"].is_not_null().sum() < rows
    assert f"stopped: the job has spent ${spent:.4f} of its limits.max_cost_usd={cap:g}" in err
    assert "resume with:" not in err
    status = [line for line in err.splitlines() if line.startswith("ray: ")]
    assert status, err
    assert f"spent or leased of limits.max_cost_usd={cap:g}" in status[-1]
    assert sim.simulator is not None
    answered = sim.simulator.answered

    assert main(["run", str(job), "--ray", "--quiet", "--set", "limits.max_cost_usd=10"]) == 0
    assert pl.read_parquet(tmp_path / "out" / "result.parquet")["response"].is_not_null().all()
    assert sim.simulator.answered <= rows + concurrency * 4  # what was answered stays answered
    assert sim.simulator.answered > answered


def test_an_aborted_run_exits_3_as_on_one_machine(
    tmp_path: Path,
    sim_factory: Callable[..., SimulatorThread],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The key refused in one shard: dispatching stops, and the run says why and how to
    resume, with exit 3, as a run on one machine does."""
    data = reviews(200)
    marked = pl.when(pl.col("id") == "k00130").then("[[sim:401]] " + pl.col("text"))
    data = data.with_columns(marked.otherwise(pl.col("text")).alias("text"))
    sections: dict[str, Any] = {"ray": {"shard_rows": 50, "workers": 2}}
    one = tmp_path / "one"
    one.mkdir()
    with SimulatorThread() as server:
        assert main(["run", str(write_job(one, server.url, data=data)), "--quiet"]) == 3
    expected = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stop")]
    assert len(expected) == 1, expected
    assert "401" in expected[0]

    folder = tmp_path / "many"
    folder.mkdir()
    job = write_job(folder, sim_factory().url, data=data, **sections)
    assert main(["run", str(job), "--ray", "--quiet"]) == 3
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("stop")] == expected
    assert err[-1] == f"resume with: batcher run {job} --ray --quiet"


def test_the_cap_holds_across_a_restart_of_the_budget_actor(
    tmp_path: Path, sim_factory: Callable[..., SimulatorThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget actor killed mid-run and restarted: it takes up what it had leased (saved
    with every lease), so the job's spending still stays within the one cap."""
    import ray

    rows, cap, concurrency = 1200, 0.05, 8
    sim = sim_factory(latency_s=0.05)
    job = write_job(
        tmp_path,
        sim.url,
        data=reviews(rows),
        limits={"max_cost_usd": cap, "concurrency": concurrency},
        ray={"shard_rows": 100, "workers": 4},
    )
    background = Background(job, monkeypatch)
    assert sim.simulator is not None
    simulator = sim.simulator
    # About $0.033 spent, more leased: forgotten, that would be leased again.
    wait_for(lambda: simulator.answered >= 300, 60)
    ray.kill(background.dispatch.budget, no_restart=False)
    summary = background.join()
    assert summary.exit_code == 3
    assert isinstance(summary.error, BudgetReachedError)
    output = pl.read_parquet(tmp_path / "out" / "result.parquet")
    spent = float(output["cost_usd"].sum())
    assert spent == pytest.approx(summary.cost_usd)
    assert spent <= cap


def test_secrets_reach_the_workers_through_no_ray_log(
    tmp_path: Path, ray_cluster: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key and the AWS credentials reach the actors (whose processes were started before
    they were set) without passing through anything Ray logs: after the run, Ray's session
    folder (its logs included) and every file of the job hold them in no form, while the
    server did see the key and echoed it into every reply."""
    key = f"sk-ray+{uuid.uuid4().hex}/SECRET="
    aws_secret = f"aws+{uuid.uuid4().hex}/SECRET="
    monkeypatch.setenv("BATCHER_API_KEY", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA" + uuid.uuid4().hex[:16].upper())
    with EchoServer() as server:
        job = write_job(tmp_path, server.url, data=reviews(30), ray={"shard_rows": 10})
        summary = run_on_ray(job)
    assert summary.rows_ok == 30
    assert server.keys == {f"Bearer {key}": 30}
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out["response"].str.contains("***", literal=True).all()  # the echo came back
    assert leaks([ray_cluster, tmp_path], [key, aws_secret]) == []
