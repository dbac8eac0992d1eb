"""Transient faults are retried until every row is answered exactly once; others are not."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from batcher.cli import main
from tests.conftest import SimFactory, prompt_of, refused_where, reviews, write_job


def test_every_fault_kind_is_survived(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory(
        fail_share=0.3,
        fail_attempts_min=1,
        fail_attempts_max=3,
        faults=("429", "500", "502", "503", "529", "drop", "stall", "malformed", "nochoices"),
        stall_s=30,
        retry_after_s=0.01,
        seed=11,
    )
    rows = 1000  # 300 or so faulty: every kind of fault many times over
    data = reviews(rows)
    job = write_job(
        tmp_path,
        server.url,
        data=data,
        endpoint={"timeout_s": 0.5},
        limits={"concurrency": 64},
        retry={"max_attempts": 6, "initial_backoff_s": 0.01, "max_backoff_s": 0.1},
    )
    assert main(["run", str(job), "--quiet"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.height == rows
    assert out["id"].n_unique() == rows
    assert out["error"].null_count() == rows
    seen = server.simulator.attempts
    expected = {prompt_of(r["id"], r["text"]): r["attempts"] for r in out.iter_rows(named=True)}
    assert expected == {p: seen[p] for p in expected}
    retried = sum(1 for n in expected.values() if n > 1)
    assert 0.2 * rows < retried < 0.4 * rows
    statuses = server.simulator.statuses
    for kind in ("429", "500", "503", "drop", "stall", "malformed", "nochoices"):
        assert statuses[kind] > 0, kind
    assert all(count == 1 for count in server.simulator.answered_by_prompt.values())


def test_client_errors_are_not_retried(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    data = refused_where(reviews(100), stars=2)
    bad = data["stars"] == 2
    job = write_job(tmp_path, server.url, data=data)
    assert main(["run", str(job), "--quiet"]) == 1
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    failed = out.filter(pl.col("error").is_not_null())
    assert failed["id"].to_list() == data.filter(bad)["id"].to_list()
    assert failed["attempts"].unique().to_list() == [1]
    assert failed["response"].null_count() == failed.height
    assert failed["error"].unique().to_list() == [
        "http_400: messages: this request was refused as invalid"
    ]
    ok = out.filter(pl.col("error").is_null())
    assert ok.height == 100 - failed.height
    assert server.simulator.statuses["400"] == failed.height
    assert "failed rows by error: http_400 20" in capsys.readouterr().err


def test_exhausted_retries_keep_the_last_error(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory(fail_share=1.0, fail_attempts_min=9, fail_attempts_max=9, faults=("503",))
    job = write_job(
        tmp_path,
        server.url,
        retry={"max_attempts": 3, "initial_backoff_s": 0.001, "max_backoff_s": 0.01},
    )
    assert main(["run", str(job), "--quiet"]) == 1
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["attempts"].unique().to_list() == [3]
    assert out["error"].unique().to_list() == ["http_503: simulated 503"]
    assert server.simulator.requests == 20 * 3


def test_hung_request_times_out_and_deadline_fails_the_row(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    server = sim_factory(
        fail_share=1.0, fail_attempts_min=9, fail_attempts_max=9, faults=("stall",), stall_s=30
    )
    job = write_job(
        tmp_path,
        server.url,
        data=reviews(4),
        endpoint={"timeout_s": 0.3},
        retry={
            "max_attempts": 10,
            "deadline_s": 1.0,
            "initial_backoff_s": 0.01,
            "max_backoff_s": 0.05,
        },
    )
    assert main(["run", str(job), "--quiet"]) == 1
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert all(e.startswith("deadline: ") for e in out["error"].to_list())
    assert all(2 <= a <= 5 for a in out["attempts"].to_list())
    assert all(lat < 2.0 for lat in out["latency_s"].to_list())
