"""Checkpoints: kill a real subprocess at random moments, resume, get every row exactly once."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from functools import partial
from pathlib import Path

import polars as pl
import pytest

from batcher.cli import main
from batcher.sim import SimulatorThread
from batcher.store.journal import COMMIT_ROWS
from tests.conftest import SimFactory, refused_where, reviews, start, wait_for, write_job

COMPARED = [
    "id",
    "response",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "error",
]
CONCURRENCY = 32


def answered_or_ended(
    server: SimulatorThread, before: int, process: subprocess.Popen[bytes]
) -> bool:
    return server.simulator.answered > before or process.poll() is not None


def uninterrupted(tmp_path: Path, sim_factory: SimFactory, data: pl.DataFrame) -> pl.DataFrame:
    folder = tmp_path / "baseline"
    folder.mkdir()
    server = sim_factory()
    job = write_job(folder, server.url, data=data, limits={"concurrency": CONCURRENCY})
    assert main(["run", str(job), "--quiet"]) == 0
    return pl.read_parquet(folder / "out/result.parquet").select(COMPARED)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path: Path, sim_factory: SimFactory) -> None:
    data = reviews(5000)
    expected = uninterrupted(tmp_path, sim_factory, data)
    server = sim_factory(latency_s=0.01, latency_jitter_s=0.03, seed=5)
    job = write_job(tmp_path, server.url, data=data, limits={"concurrency": CONCURRENCY})
    chance = random.Random(2024)
    kills = 0
    allowance = 0
    while kills < 5:
        before = server.simulator.answered
        process = start(job, capture=False)
        # Wait until this run has answered something, then kill it at a random moment.
        wait_for(partial(answered_or_ended, server, before, process))
        time.sleep(chance.uniform(0.05, 0.8))
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        allowance += CONCURRENCY + COMMIT_ROWS
    assert kills == 5, "the job finished before it could be killed five times"
    # The resume that finishes it is not killed: here, and at any concurrency.
    assert main(["run", str(job), "--quiet", "--set", "limits.concurrency=128"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.height == 5000
    assert out["id"].n_unique() == 5000
    assert out.select(COMPARED).equals(expected)
    assert 5000 <= server.simulator.answered <= 5000 + allowance


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_finishes_in_flight_and_resumes_without_duplicates(
    tmp_path: Path, sim_factory: SimFactory, stop: signal.Signals
) -> None:
    rows = 2000
    data = reviews(rows)
    expected = uninterrupted(tmp_path, sim_factory, data)
    server = sim_factory(latency_s=0.02, latency_jitter_s=0.02, seed=9)
    job = write_job(tmp_path, server.url, data=data, limits={"concurrency": CONCURRENCY})
    process = start(job)
    wait_for(lambda: server.simulator.answered > 500)
    process.send_signal(stop)
    _, err = process.communicate(timeout=60)
    text = err.decode()
    assert process.returncode == 3, text
    assert f"stopped: interrupted by {stop.name}" in text
    assert "resume with: batcher run" in text
    partial = pl.read_parquet(tmp_path / "out/result.parquet")
    assert 500 < partial.height < rows
    assert partial["error"].null_count() == partial.height
    assert main(["status", str(job)]) == 0
    # The resume is not interrupted: here, and at any concurrency.
    assert main(["run", str(job), "--quiet", "--set", "limits.concurrency=128"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.select(COMPARED).equals(expected)
    assert server.simulator.answered == rows  # nothing paid twice
    assert max(server.simulator.answered_by_prompt.values()) == 1


def test_edit_template_resends_only_changed_rows(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory()
    data = reviews(60)
    job = write_job(tmp_path, server.url, data=data)
    assert main(["run", str(job), "--quiet"]) == 0
    first = pl.read_parquet(tmp_path / "out/result.parquet")
    assert server.simulator.answered == 60

    assert main(["run", str(job), "--quiet"]) == 0
    assert server.simulator.answered == 60  # identical run: nothing sent
    assert (
        pl.read_parquet(tmp_path / "out/result.parquet")
        .drop("latency_s")
        .equals(first.drop("latency_s"))
    )

    # CSV columns are text: the template compares with "5" (input.dtypes would make it 5).
    changed = 'Review {{ id }}: {{ text }}{% if stars == "5" %} (five stars){% endif %}'
    job = write_job(tmp_path, server.url, data=data, request={"prompt": changed})
    assert main(["run", str(job), "--quiet"]) == 0
    five = data.filter(pl.col("stars") == 5).height
    assert server.simulator.answered == 60 + five
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.height == 60
    moved = out.filter(pl.col("response") != first["response"])
    assert set(moved["id"]) <= set(data.filter(pl.col("stars") == 5)["id"])


def test_failed_rows_are_retried_unless_skip_failed(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    server = sim_factory()
    data = reviews(30)
    data = refused_where(data, stars=1)
    bad = data.filter(pl.col("stars") == 1).height
    job = write_job(tmp_path, server.url, data=data)
    assert main(["run", str(job), "--quiet"]) == 1
    assert server.simulator.requests == 30
    assert main(["run", str(job), "--quiet"]) == 1
    assert server.simulator.requests == 30 + bad
    assert main(["run", str(job), "--quiet", "--skip-failed"]) == 1
    assert server.simulator.requests == 30 + bad
    assert pl.read_parquet(tmp_path / "out/result.parquet")["error"].drop_nulls().len() == bad


def test_foreign_journal_is_refused_and_fresh_replaces_it(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url)
    assert main(["run", str(job), "--quiet"]) == 0
    other = tmp_path / "other.csv"
    reviews(5).write_csv(other)
    job = write_job(tmp_path, server.url, input={"path": "other.csv"})
    capsys.readouterr()
    assert main(["run", str(job), "--quiet"]) == 2
    assert "belongs to another job" in capsys.readouterr().err
    assert main(["run", str(job), "--quiet", "--fresh"]) == 0
    assert "--fresh: replacing the checkpoint" in capsys.readouterr().err
    assert pl.read_parquet(tmp_path / "out/result.parquet").height == 5


def test_status_reads_the_journal(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    data = reviews(40)
    data = refused_where(data, stars=2)
    job = write_job(tmp_path, server.url, data=data)
    assert main(["status", str(job)]) == 0
    assert "no checkpoint yet: 40 rows pending" in capsys.readouterr().out
    assert main(["run", str(job), "--quiet", "--limit", "25"]) == 1
    bad = data[:25].filter(pl.col("stars") == 2).height
    assert main(["status", str(job)]) == 0
    out = capsys.readouterr().out
    assert f"{25 - bad} done, {bad} failed, 15 pending" in out
    assert f"failed by error: http_400 {bad}" in out


def test_stale_temporary_output_is_cleaned(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url)
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out/.result.parquet.999.tmp"
    stale.write_bytes(b"half a parquet file")
    assert main(["run", str(job), "--quiet"]) == 0
    assert not stale.exists()
    assert pl.read_parquet(tmp_path / "out/result.parquet").height == 20


def test_resume_renders_only_rows_whose_inputs_changed(
    tmp_path: Path, sim_factory: SimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batcher.rows.request import RequestBuilder

    server = sim_factory()
    data = reviews(40)
    job = write_job(tmp_path, server.url, data=data)
    assert main(["run", str(job), "--quiet"]) == 0
    rendered: list[object] = []
    original = RequestBuilder.build

    def counting(self: RequestBuilder, key: object, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        rendered.append(key)
        return original(self, key, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RequestBuilder, "build", counting)
    assert main(["run", str(job), "--quiet"]) == 0
    assert rendered == []  # neither dispatch nor the output rebuild rendered a row
    changed = data.with_columns(
        pl.when(pl.col("id") == "k00007")
        .then(pl.lit("an edited review"))
        .otherwise(pl.col("text"))
        .alias("text")
    )
    changed.write_csv(tmp_path / "data.csv")
    assert main(["run", str(job), "--quiet"]) == 0
    assert set(rendered) == {"k00007"}
    assert server.simulator.answered == 41
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.filter(pl.col("id") == "k00007")["response"][0].endswith(
        "an edited review. The end."
    )
