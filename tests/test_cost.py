"""Cost: per-row dollars, the cost report, estimates before spending, and the budget cap."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from batcher.cli import main
from tests.conftest import SimFactory, refused_where, reviews, write_job

HAIKU = (0.80, 4.0, 0.08)  # input, output, cache read: USD per million tokens


def test_cost_column_is_tokens_times_prices(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory(cached_share=0.25)
    job = write_job(tmp_path, server.url)
    assert main(["run", str(job), "--quiet"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert (out["cached_tokens"] > 0).all()
    for row in out.iter_rows(named=True):
        fresh = row["prompt_tokens"] - row["cached_tokens"]
        expected = (
            fresh * HAIKU[0] + row["cached_tokens"] * HAIKU[2] + row["completion_tokens"] * HAIKU[1]
        ) / 1e6
        assert row["cost_usd"] == pytest.approx(expected)


def test_unknown_model_costs_null_with_one_warning(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url, request={"model": "house-model-7"})
    assert main(["run", str(job), "--quiet"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["cost_usd"].null_count() == 20
    err = capsys.readouterr().err
    assert err.count("no price for model house-model-7") == 1


def test_job_prices_and_price_file_override(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory()
    job = write_job(
        tmp_path,
        server.url,
        request={"model": "house-model-7"},
        prices={"house-model-7": {"input": 1, "output": 2}},
    )
    assert main(["run", str(job), "--quiet"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    expected = (out["prompt_tokens"] * 1 + out["completion_tokens"] * 2) / 1e6
    assert ((out["cost_usd"] - expected).abs() < 1e-12).all()
    table = tmp_path / "prices.yaml"
    table.write_text("models:\n  claude-3-5-haiku-20241022: {input: 10, output: 20}\n")
    other = write_job(tmp_path, server.url, name="other.yaml", output={"path": "out/other.parquet"})
    assert main(["run", str(other), "--quiet", "--prices", str(table)]) == 0
    out = pl.read_parquet(tmp_path / "out/other.parquet")
    expected = (out["prompt_tokens"] * 10 + out["completion_tokens"] * 20) / 1e6
    assert ((out["cost_usd"] - expected).abs() < 1e-12).all()


def test_cost_report_totals_and_groups(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    data = refused_where(reviews(60), stars=3)
    job = write_job(tmp_path, server.url, data=data)
    assert main(["run", str(job), "--quiet"]) == 1
    output = tmp_path / "out/result.parquet"
    capsys.readouterr()
    assert main(["cost", str(output), "--by", "stars", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    out = pl.read_parquet(output)
    assert report["total"]["rows"] == 60
    assert report["total"]["failed"] == out["error"].drop_nulls().len()
    assert report["total"]["cost_usd"] == pytest.approx(out["cost_usd"].sum())
    assert report["total"]["prompt_tokens"] == out["prompt_tokens"].sum()
    for group in report["groups"]:
        part = out.filter(pl.col("stars") == group["key"])
        assert group["rows"] == part.height
        assert group["completion_tokens"] == part["completion_tokens"].sum()
        assert group["cost_usd"] == pytest.approx(part["cost_usd"].sum())
    assert main(["cost", str(output)]) == 0
    table = capsys.readouterr().out
    assert "claude-3-5-haiku-20241022" in table
    assert "TOTAL" in table
    assert main(["cost", str(output), "--by", "nope"]) == 2


def test_estimate_sends_nothing_and_bounds_the_real_cost(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url, data=reviews(200), request={"max_tokens": 24})
    assert main(["estimate", str(job), "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    assert server.simulator.requests == 0
    assert estimate["rows"] == 200
    assert estimate["completion_tokens_high"] == 200 * 24
    assert estimate["low_usd"] <= estimate["expected_usd"] <= estimate["high_usd"]
    assert main(["run", str(job), "--quiet"]) == 0
    real = pl.read_parquet(tmp_path / "out/result.parquet")["cost_usd"].sum()
    assert estimate["high_usd"] >= real
    assert estimate["duration_s"] > 0


def test_estimate_sample_is_not_paid_twice(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url, data=reviews(200))
    assert main(["estimate", str(job), "--sample", "20", "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    assert server.simulator.answered == 20
    assert estimate["low_usd"] <= estimate["expected_usd"] <= estimate["high_usd"]
    assert main(["run", str(job), "--quiet"]) == 0
    assert server.simulator.answered == 200
    assert max(server.simulator.answered_by_prompt.values()) == 1
    real = pl.read_parquet(tmp_path / "out/result.parquet")["cost_usd"].sum()
    assert estimate["low_usd"] * 0.5 <= real <= estimate["high_usd"] * 1.5


def test_budget_cap_stops_then_resumes(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory(latency_s=0.005)
    job = write_job(
        tmp_path, server.url, data=reviews(300), limits={"concurrency": 8, "max_cost_usd": 0.01}
    )
    assert main(["run", str(job), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "of its limits.max_cost_usd=0.01" in err
    assert "raise limits.max_cost_usd to go on" in err
    assert "resume with:" not in err  # a rerun at this cap would send nothing
    partial = pl.read_parquet(tmp_path / "out/result.parquet")
    assert 0 < partial.height < 300
    assert partial["cost_usd"].sum() <= 0.01
    assert main(["run", str(job), "--quiet", "--set", "limits.max_cost_usd=10"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.height == 300
    assert server.simulator.answered == 300
