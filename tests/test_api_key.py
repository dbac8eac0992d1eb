"""The API key goes in the Authorization header and nowhere else; a refused key stops the job."""

from __future__ import annotations

from pathlib import Path

import pytest

from batcher.cli import main
from batcher.sim import SimulatorThread
from tests.conftest import reviews, write_job

SECRET = "sk-test-SECRET-0123456789abcdef"


def all_written_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_key_only_in_authorization_header(
    tmp_path: Path,
    sim: SimulatorThread,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MY_KEY", SECRET)
    data = reviews(20)
    data = data.with_columns(data["text"].str.replace("review number 3 ", "[[sim:400]] "))
    job = write_job(tmp_path, sim.url, data=data, endpoint={"api_key_env": "MY_KEY"})
    assert main(["run", str(job)]) == 1  # one row refused with 400
    captured = capsys.readouterr()
    assert sim.simulator.authorization == {"bearer": 20}
    assert SECRET not in captured.out + captured.err
    assert SECRET.encode() not in all_written_bytes(tmp_path)
    assert main(["status", str(job)]) == 0
    assert SECRET not in capsys.readouterr().out


def test_refused_key_stops_the_job(
    tmp_path: Path, sim_factory, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = sim_factory(latency_s=0.01)
    monkeypatch.setenv("MY_KEY", SECRET)
    data = reviews(500).with_columns(("[[sim:401]] " + reviews(500)["text"]).alias("text"))
    job = write_job(
        tmp_path,
        server.url,
        data=data,
        endpoint={"api_key_env": "MY_KEY"},
        limits={"concurrency": 4},
    )
    assert main(["run", str(job), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "refused the API key from $MY_KEY" in err
    assert SECRET not in err
    assert server.simulator.requests <= 8  # stopped at once, not 500 attempts
    assert SECRET.encode() not in all_written_bytes(tmp_path)
    assert "resume with: batcher run" in err


def test_exhausted_balance_stops_the_job(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    data = reviews(200).with_columns(("[[sim:402]] " + reviews(200)["text"]).alias("text"))
    job = write_job(tmp_path, sim.url, data=data, limits={"concurrency": 2})
    assert main(["run", str(job), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "cannot pay" in err
    assert sim.simulator.requests <= 4
