"""The checkpoint as a shared resource: one run at a time, a moved project, a damaged file,
and faults of its disk or folder after requests were sent."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import batcher.store.journal
from batcher.cli import main
from batcher.store.journal import journal_path, reading, totals
from tests.conftest import (
    SimFactory,
    busy_job,
    rerun,
    reviews,
    run_sabotaged,
    start,
    wait_for,
    write_job,
)


def committed_rows(checkpoint: Path) -> int:
    with reading(journal_path(checkpoint)) as connection:
        held = totals(connection)
    return held.ok + held.failed


def test_second_run_of_the_same_job_is_refused_and_a_killed_run_is_taken_over(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # Slow enough that the first run cannot finish while the second starts and is refused.
    server = sim_factory(latency_s=0.5)
    job = write_job(tmp_path, server.url, data=reviews(200), limits={"concurrency": 4})
    first = start(job, capture=False)
    try:
        wait_for(lambda: server.simulator.answered > 0)
        second = start(job)
        _, err = second.communicate(timeout=60)
        text = err.decode()
        assert second.returncode == 2, text
        assert text.count("\n") == 1
        assert "another run of this job is using this checkpoint" in text
        assert f"(pid {first.pid} on " in text
        assert ", started 20" in text
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert server.simulator.answered < 200
    # The kernel dropped the killed run's lock: its successor takes the checkpoint over.
    assert rerun(job) == 0
    assert pl.read_parquet(tmp_path / "out/result.parquet").height == 200


def test_a_live_runs_temporary_output_is_not_cleaned(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url)
    (tmp_path / "out").mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f"out/.result.parquet.{sleeper.pid}.tmp"
        live.write_bytes(b"another process is writing this")
        assert main(["run", str(job), "--quiet"]) == 0
        assert live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_moved_project_folder_keeps_its_checkpoint(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory()
    project = tmp_path / "project"
    project.mkdir()
    job = write_job(project, server.url)
    assert main(["run", str(job), "--quiet"]) == 0
    moved = tmp_path / "elsewhere/project"
    shutil.copytree(project, moved)
    shutil.rmtree(project)
    assert main(["run", str(moved / "job.yaml"), "--quiet"]) == 0
    assert server.simulator.requests == 20  # resumed: nothing sent again
    assert pl.read_parquet(moved / "out/result.parquet").height == 20


def test_checkpoint_with_absolute_identity_is_still_this_jobs(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url)
    assert main(["run", str(job), "--quiet"]) == 0
    journal = journal_path(tmp_path / "out/result.parquet.checkpoint")
    connection = sqlite3.connect(journal)
    with connection:  # as checkpoints written before identities became relative
        connection.execute(
            "UPDATE meta SET value = ? WHERE name = 'input'", (str(tmp_path / "data.csv"),)
        )
        connection.execute(
            "UPDATE meta SET value = ? WHERE name = 'output'",
            (str(tmp_path / "out/result.parquet"),),
        )
    connection.close()
    assert main(["run", str(job), "--quiet"]) == 0
    assert server.simulator.requests == 20
    connection = sqlite3.connect(journal)
    stored = dict(connection.execute("SELECT name, value FROM meta").fetchall())
    connection.close()
    assert stored["input"] == "data.csv"
    assert stored["output"] == "out/result.parquet"


def test_damaged_checkpoint_is_found_at_open_by_run_and_status(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url, data=reviews(1500), limits={"concurrency": 64})
    assert main(["run", str(job), "--quiet"]) == 0
    journal = journal_path(tmp_path / "out/result.parquet.checkpoint")
    size = journal.stat().st_size
    assert size > 100_000
    with journal.open("r+b") as handle:  # garbage deep inside, on a page of rows
        handle.seek(size // 2 // 4096 * 4096 + 100)
        handle.write(bytes(range(256)) * 8)
    capsys.readouterr()
    assert main(["run", str(job), "--quiet"]) == 2
    run_err = capsys.readouterr().err
    assert run_err.count("\n") == 1
    assert "the checkpoint is damaged" in run_err
    assert "--fresh" in run_err
    assert server.simulator.requests == 1500
    assert main(["status", str(job)]) == 2
    status = capsys.readouterr()
    assert status.err == run_err
    assert status.out == ""
    assert main(["run", str(job), "--quiet", "--fresh"]) == 0


def test_checkpoint_folder_deleted_mid_run_is_restored(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory(latency_s=0.02)
    job = busy_job(tmp_path, server.url, 300)
    checkpoint = tmp_path / "ck"
    assert run_sabotaged(job, server, lambda: shutil.rmtree(checkpoint), after=60) == 3
    err = capsys.readouterr().err
    assert "stopped: " in err
    assert "the checkpoint was deleted during the run; every committed row was restored" in err
    kept = committed_rows(checkpoint)
    assert 60 < kept < 300
    assert pl.read_parquet(tmp_path / "out/result.parquet").height == kept
    wait_for(lambda: server.simulator.in_flight == 0)  # requests cut off still count answers
    answered = server.simulator.answered
    assert main(["run", str(job), "--quiet"]) == 0
    assert server.simulator.answered - answered == 300 - kept  # the kept rows are not resent
    assert pl.read_parquet(tmp_path / "out/result.parquet").height == 300


def test_full_checkpoint_disk_keeps_committed_rows_and_exits_3(
    tmp_path: Path,
    sim_factory: SimFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = batcher.store.journal.connect

    def small_disk(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
        connection = original(path, readonly=readonly)
        # SQLite's own "database or disk is full" after about 100 rows (the schema takes 7 pages)
        if not readonly:
            connection.execute("PRAGMA max_page_count = 11")
        return connection

    monkeypatch.setattr(batcher.store.journal, "connect", small_disk)
    server = sim_factory(latency_s=0.02)
    job = write_job(tmp_path, server.url, data=reviews(400), limits={"concurrency": 2})
    assert main(["run", str(job), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "cannot write the checkpoint (database or disk is full)" in err
    assert "nothing was sent" not in err
    assert "error: " not in err  # a summary with its reason, not a configuration error
    kept = committed_rows(tmp_path / "out/result.parquet.checkpoint")
    assert 0 < kept < 400
    assert pl.read_parquet(tmp_path / "out/result.parquet").height == kept
    monkeypatch.setattr(batcher.store.journal, "connect", original)
    wait_for(lambda: server.simulator.in_flight == 0)  # requests cut off still count answers
    answered = server.simulator.answered
    assert rerun(job) == 0
    assert server.simulator.answered - answered == 400 - kept
