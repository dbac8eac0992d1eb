"""Faults at the output after requests were paid for: exit 3, one line, nothing lost, and the
output rebuilt then or by the next run without sending again."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from batcher.cli import main
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


def test_output_path_that_is_a_folder_is_refused_before_sending(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url)
    (tmp_path / "out/result.parquet").mkdir(parents=True)
    assert main(["run", str(job), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"error: {job}: output.path: {tmp_path / 'out/result.parquet'} is a folder, not a file\n"
    )
    assert server.simulator.requests == 0


def test_disk_full_at_the_output_write(
    tmp_path: Path,
    sim_factory: SimFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def full(self: pq.ParquetWriter, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    server = sim_factory()
    job = write_job(tmp_path, server.url)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    assert main(["run", str(job), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cannot write the output (No space left on device)" in err
    assert f"run `batcher run {job} --quiet` to rebuild the output" in err
    assert not (tmp_path / "out/result.parquet").exists()
    assert [p.name for p in (tmp_path / "out").glob(".*.tmp")] == []
    monkeypatch.undo()
    assert main(["run", str(job), "--quiet"]) == 0
    assert server.simulator.requests == 20  # rebuilt from the checkpoint, nothing resent
    assert pl.read_parquet(tmp_path / "out/result.parquet").height == 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """A real small file system (tmpfs) mounted on a folder; skips where mounting is denied."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a small tmpfs needs root")
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
        if subprocess.run(command, capture_output=True, check=False).returncode != 0:
            pytest.skip("this machine does not allow mounting a tmpfs")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def test_real_disk_full_at_the_output_write(
    tmp_path: Path,
    sim_factory: SimFactory,
    capsys: pytest.CaptureFixture[str],
    small_disk: Callable[[str, str], Path],
) -> None:
    server = sim_factory()
    out = small_disk("out", "64k")
    data = reviews(20).with_columns(pl.Series("blob", [os.urandom(8_000).hex() for _ in range(20)]))
    job = write_job(tmp_path, server.url, data=data, output={"checkpoint_dir": "ck"})
    assert main(["run", str(job), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cannot write the output (No space left on device)" in err
    assert list(out.iterdir()) == []  # no temporary left behind on the full disk
    subprocess.run(["mount", "-o", "remount,size=16m", str(out)], check=True)
    assert main(["run", str(job), "--quiet"]) == 0
    assert server.simulator.requests == 20
    assert pl.read_parquet(out / "result.parquet").height == 20


def test_real_disk_full_in_the_checkpoint(
    tmp_path: Path,
    sim_factory: SimFactory,
    capsys: pytest.CaptureFixture[str],
    small_disk: Callable[[str, str], Path],
) -> None:
    server = sim_factory(latency_s=0.005)
    checkpoint = small_disk("ck", "192k")  # the schema and the first commits fit, not all rows
    job = write_job(
        tmp_path,
        server.url,
        data=reviews(3000),
        limits={"concurrency": 16},
        output={"checkpoint_dir": "ck"},
    )
    assert main(["run", str(job), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "cannot write the checkpoint" in err
    assert "full" in err
    assert "nothing was sent" not in err
    kept = pl.read_parquet(tmp_path / "out/result.parquet").height
    assert 0 < kept < 3000
    subprocess.run(["mount", "-o", "remount,size=16m", str(checkpoint)], check=True)
    wait_for(lambda: server.simulator.in_flight == 0)  # requests cut off still count answers
    answered = server.simulator.answered
    assert rerun(job) == 0
    assert server.simulator.answered - answered == 3000 - kept


def test_output_folder_gone_mid_run(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory(latency_s=0.02)
    job = busy_job(tmp_path, server.url, 200)

    def replace_folder_with_a_file() -> None:
        shutil.rmtree(tmp_path / "out")
        (tmp_path / "out").write_text("not a folder")

    assert run_sabotaged(job, server, replace_folder_with_a_file, after=20) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: {tmp_path / 'out/result.parquet'}: cannot write the output")
    assert "rows already answered are not sent again" in err
    (tmp_path / "out").unlink()
    assert rerun(job) == 0
    assert server.simulator.answered == 200
    assert pl.read_parquet(tmp_path / "out/result.parquet").height == 200


def test_output_file_system_made_read_only_mid_run(
    tmp_path: Path,
    sim_factory: SimFactory,
    capsys: pytest.CaptureFixture[str],
    small_disk: Callable[[str, str], Path],
) -> None:
    server = sim_factory(latency_s=0.02)
    out = small_disk("out", "16m")
    job = busy_job(tmp_path, server.url, 200)

    def make_read_only() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True)

    assert run_sabotaged(job, server, make_read_only, after=20) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cannot write the output (Read-only file system)" in err
    subprocess.run(["mount", "-o", "remount,rw", str(out)], check=True)
    assert rerun(job) == 0
    assert server.simulator.answered == 200
    assert pl.read_parquet(out / "result.parquet").height == 200


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_folder_made_read_only_mid_run(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory(latency_s=0.02)
    job = busy_job(tmp_path, server.url, 200)

    def make_read_only() -> None:
        (tmp_path / "out").chmod(0o555)

    try:
        assert run_sabotaged(job, server, make_read_only, after=20) == 3
    finally:
        (tmp_path / "out").chmod(0o755)
    err = capsys.readouterr().err
    assert "cannot write the output (Permission denied)" in err
    assert main(["run", str(job), "--quiet"]) == 0
    assert server.simulator.answered == 200


def test_limit_bounds_what_is_sent_not_the_output(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url, data=reviews(30))
    assert main(["run", str(job), "--quiet", "--limit", "12"]) == 0
    assert pl.read_parquet(tmp_path / "out/result.parquet").height == 12
    assert main(["run", str(job), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(job), "--quiet", "--limit", "10"]) == 0
    assert "rows: 10 ok, 0 failed, 0 pending of 10" in capsys.readouterr().err
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["id"].to_list() == reviews(30)["id"].to_list()
    assert server.simulator.requests == 30
    assert main(["run", str(job), "--quiet", "--limit", "1000"]) == 0  # past the end
    assert "rows: 30 ok, 0 failed, 0 pending of 30" in capsys.readouterr().err
    assert main(["run", str(job), "--quiet", "--limit", str(10**20)]) == 2
    assert "argument --limit: must be 0 to 4294967295" in capsys.readouterr().err


def _big_output_job(folder: Path, base_url: str) -> Path:
    """A job whose output takes a while to write: every row keeps a 40 kB column that is not
    sent (only `text` is), so sending is quick and the write is not."""
    rows = 2500
    blobs = [os.urandom(20_000).hex() for _ in range(rows)]
    data = reviews(rows).with_columns(pl.Series("blob", blobs))
    return write_job(folder, base_url, data=data, fmt="parquet", limits={"concurrency": 64})


@pytest.mark.parametrize(
    "signals",
    [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]],
    ids=["SIGTERM", "SIGINT-twice"],
)
def test_signal_during_the_output_write(
    tmp_path: Path, sim_factory: SimFactory, signals: list[signal.Signals]
) -> None:
    server = sim_factory()
    job = _big_output_job(tmp_path, server.url)
    process = start(job)
    temporary = tmp_path / f"out/.result.parquet.{process.pid}.tmp"
    wait_for(lambda: temporary.exists() or process.poll() is not None, timeout=120)
    assert process.poll() is None, "the run ended before its output write could be signalled"
    for sent in signals:
        process.send_signal(sent)
    _, err = process.communicate(timeout=120)
    text = err.decode()
    assert process.returncode == 3, text
    assert "Traceback" not in text
    assert "the output is being written; it finishes first" in text
    assert f"stopped: interrupted by {signals[0].name}" in text
    out = pl.read_parquet(tmp_path / "out/result.parquet", columns=["id", "error"])
    assert out.height == 2500
    assert out["error"].null_count() == 2500
    assert server.simulator.answered == 2500
