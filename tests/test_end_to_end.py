"""The foundation, end to end over loopback HTTP against the simulator."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from batcher.cli import main
from batcher.sim import SimulatorThread
from tests.conftest import SimFactory, prompt_of, reviews, write_job

OUTPUT_COLUMNS = [
    "response",
    "finish_reason",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cost_usd",
    "latency_s",
    "attempts",
    "error",
    "response_id",
    "tool_calls",
    "reasoning",
]


def run(job: Path, *extra: str) -> int:
    return main(["run", str(job), "--quiet", *extra])


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_job_writes_every_row_in_order_with_usage(
    tmp_path: Path, sim: SimulatorThread, fmt: str
) -> None:
    data = reviews(50)
    # CSV columns are text unless declared; Parquet ones keep their type (the cast is a no-op).
    inputs = {"path": f"data.{fmt}", "dtypes": {"stars": "int64"}}
    job = write_job(tmp_path, sim.url, data=data, fmt=fmt, input=inputs)
    assert run(job) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.columns == ["id", "title", "text", "stars", *OUTPUT_COLUMNS]
    assert out["id"].to_list() == data["id"].to_list()
    assert out["error"].null_count() == 50
    assert out["attempts"].to_list() == [1] * 50
    assert out["model"].unique().to_list() == ["claude-3-5-haiku-20241022"]
    assert out["stars"].dtype == pl.Int64
    usage = sim.simulator.usage_by_prompt
    for row in out.iter_rows(named=True):
        sent = usage[prompt_of(row["id"], row["text"])]
        assert row["prompt_tokens"] == sent["prompt_tokens"]
        assert row["completion_tokens"] == sent["completion_tokens"]
        assert row["total_tokens"] == sent["total_tokens"]
        assert row["response"].startswith("Simulated reply")


def test_row_index_key_and_keep_columns(tmp_path: Path, sim: SimulatorThread) -> None:
    data = reviews(30).drop("id")
    job = write_job(
        tmp_path,
        sim.url,
        data=data,
        input={"path": "data.csv", "id_column": None},
        request={"prompt": "{{ title }}: {{ text }}"},
        output={"keep_columns": ["title"]},
    )
    assert run(job) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.columns[:2] == ["row_index", "title"]
    assert out["row_index"].dtype == pl.Int64
    assert out["row_index"].to_list() == list(range(30))
    assert "text" not in out.columns


def test_order_and_uniqueness_under_concurrency_with_random_latency(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    server = sim_factory(latency_s=0.001, latency_jitter_s=0.05, seed=3)
    data = reviews(400)
    job = write_job(tmp_path, server.url, data=data, limits={"concurrency": 64})
    assert run(job) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["id"].to_list() == data["id"].to_list()
    assert out["id"].n_unique() == 400
    assert server.simulator.max_in_flight > 1
    assert server.simulator.max_in_flight <= 64
    assert server.simulator.answered == 400


def test_glob_of_inputs_and_limit(tmp_path: Path, sim: SimulatorThread) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    data = reviews(30)
    data[:10].write_parquet(parts / "a.parquet")
    data[10:].write_parquet(parts / "b.parquet")
    job = write_job(tmp_path, sim.url, input={"path": "parts/*.parquet"})
    assert run(job, "--limit", "25") == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["id"].to_list() == data["id"].to_list()[:25]
    assert sim.simulator.answered == 25


def test_set_overrides_and_env_substitution(
    tmp_path: Path, sim: SimulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REVIEW_MODEL", "claude-3-haiku-20240307")
    job = write_job(tmp_path, "http://127.0.0.1:9/v1", request={"model": "${REVIEW_MODEL}"})
    assert run(job, "--set", f"endpoint.base_url={sim.url}", "--set", "limits.concurrency=4") == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["model"].unique().to_list() == ["claude-3-haiku-20240307"]
    assert sim.simulator.max_in_flight <= 4


def test_python_api_returns_a_summary(tmp_path: Path, sim: SimulatorThread) -> None:
    import batcher

    job = write_job(tmp_path, sim.url)
    summary = batcher.run(job, quiet=True)
    assert summary.exit_code == 0
    assert (summary.rows_ok, summary.rows_failed, summary.rows_pending) == (20, 0, 0)
    assert summary.requests == 20
    assert summary.prompt_tokens == sum(
        u["prompt_tokens"] for u in sim.simulator.usage_by_prompt.values()
    )


def test_python_api_summary_carries_why_the_run_stopped(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    import batcher

    job = write_job(tmp_path, sim.url, limits={"max_cost_usd": 0.0005, "concurrency": 1})
    summary = batcher.run(job, quiet=True)
    assert isinstance(summary.error, batcher.BudgetReachedError)
    assert summary.aborted == str(summary.error)
    assert summary.exit_code == 3
    assert summary.rows_ok > 0
    assert summary.rows_pending > 0
    assert batcher.run(job, quiet=True, limit=0).error is None


def test_simulate_flag_runs_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path, "https://gateway.example.invalid/v1")
    assert run(job, "--simulate") == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.height == 20
    assert out["error"].null_count() == 20
    assert "20 ok, 0 failed" in capsys.readouterr().err


def test_output_is_replaced_atomically(tmp_path: Path, sim: SimulatorThread) -> None:
    job = write_job(tmp_path, sim.url)
    assert run(job) == 0
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_httpx_transport_is_selectable(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory(
        fail_share=0.3, faults=("503", "drop"), fail_attempts_max=1, retry_after_s=0.01
    )
    job = write_job(tmp_path, server.url, endpoint={"transport": "httpx"}, data=reviews(60))
    assert run(job) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["error"].null_count() == 60
    assert out["attempts"].max() == 2
