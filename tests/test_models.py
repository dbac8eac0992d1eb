"""Several models in one job: one output row per (input row, model), each checkpointed and
priced on its own, so adding a model to the list sends that model's rows only."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import polars as pl
import pytest

from batcher.cli import main
from batcher.reports.ledger import read_ledger
from batcher.sim import SimulatorThread
from tests.conftest import MODEL, SimFactory, reviews, write_job

SONNET = "claude-sonnet-4-20250514"
OLD_HAIKU = "claude-3-haiku-20240307"
# Input and output USD per million tokens, from the shipped price table.
PRICES = {MODEL: (0.80, 4.0), SONNET: (3.0, 15.0), OLD_HAIKU: (0.25, 1.25)}


def requests_seen(base_url: str) -> int:
    """What the simulator counted, from its own stats endpoint."""
    stats = httpx.get(base_url.removesuffix("/v1") + "/sim/stats").json()
    return int(stats["requests"])


def test_two_models_then_a_third_sends_only_its_rows(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    server = sim_factory()
    data = reviews(200)
    job = write_job(tmp_path, server.url, data=data, request={"model": [MODEL, SONNET]})
    assert main(["run", str(job), "--quiet"]) == 0
    assert requests_seen(server.url) == 400
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.height == 400
    # Input order, and within a row the list's order.
    assert out["id"].to_list() == [i for i in data["id"].to_list() for _ in range(2)]
    assert out["request_model"].to_list() == [MODEL, SONNET] * 200
    assert out.columns.index("request_model") == out.columns.index("response") - 1
    assert (out["model"] == out["request_model"]).all()  # the simulator answers as asked
    for row in out.iter_rows(named=True):
        price_in, price_out = PRICES[row["request_model"]]
        expected = (row["prompt_tokens"] * price_in + row["completion_tokens"] * price_out) / 1e6
        assert row["cost_usd"] == pytest.approx(expected)
    # The two models cost differently for the same rows: the split is real.
    by_model = {g["key"]: g for g in read_ledger(tmp_path / "out/result.parquet").groups}
    assert set(by_model) == {MODEL, SONNET}
    assert by_model[SONNET]["cost_usd"] > by_model[MODEL]["cost_usd"] * 3
    assert by_model[MODEL]["rows"] == by_model[SONNET]["rows"] == 200

    job = write_job(tmp_path, server.url, request={"model": [MODEL, SONNET, OLD_HAIKU]})
    assert main(["run", str(job), "--quiet"]) == 0
    assert requests_seen(server.url) == 400 + 200
    grown = pl.read_parquet(tmp_path / "out/result.parquet")
    assert grown.height == 600
    assert grown["request_model"].to_list() == [MODEL, SONNET, OLD_HAIKU] * 200
    # The first two models' rows are the ones answered before, untouched.
    kept = grown.filter(pl.col("request_model") != OLD_HAIKU)
    assert kept.select("id", "request_model", "response", "cost_usd").equals(
        out.select("id", "request_model", "response", "cost_usd")
    )


def test_single_model_output_has_no_request_model_column(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    job = write_job(tmp_path, sim.url)
    assert main(["run", str(job), "--quiet"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.height == 20
    assert "request_model" not in out.columns


def test_cost_and_estimate_split_by_request_model(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, sim.url, request={"model": [MODEL, SONNET]})
    capsys.readouterr()
    assert main(["estimate", str(job), "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    assert estimate["rows"] == 40
    groups = {g["request_model"]: g for g in estimate["by_request_model"]}
    assert [g["request_model"] for g in estimate["by_request_model"]] == [MODEL, SONNET]
    assert groups[MODEL]["rows"] == groups[SONNET]["rows"] == 20
    assert groups[MODEL]["prompt_tokens"] == groups[SONNET]["prompt_tokens"]
    # Same tokens, sonnet's prices: 3.75 times haiku's on both input and output.
    assert groups[SONNET]["high_usd"] == pytest.approx(groups[MODEL]["high_usd"] * 3.75)
    assert estimate["high_usd"] == pytest.approx(
        groups[MODEL]["high_usd"] + groups[SONNET]["high_usd"]
    )
    assert main(["run", str(job), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["cost", str(tmp_path / "out/result.parquet"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {g["key"]: g["rows"] for g in report["groups"]} == {MODEL: 20, SONNET: 20}
    assert report["total"]["rows"] == 40


def test_model_list_errors_before_sending(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, sim.url, request={"model": [MODEL, MODEL]})
    assert main(["run", str(job), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "request.model" in err
    assert "distinct" in err
    data = reviews(5).with_columns(pl.lit("x").alias("request_model"))
    folder = tmp_path / "clash"
    folder.mkdir()
    job = write_job(folder, sim.url, data=data, request={"model": [MODEL, SONNET]})
    assert main(["run", str(job), "--quiet"]) == 2
    assert "request_model" in capsys.readouterr().err
    assert requests_seen(sim.url) == 0


def test_status_counts_rows_of_every_model(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, sim.url, request={"model": [MODEL, SONNET]})
    assert main(["run", str(job), "--quiet", "--limit", "5"]) == 0
    capsys.readouterr()
    assert main(["status", str(job)]) == 0
    assert "rows: 40 to answer; 10 done, 0 failed, 30 pending" in capsys.readouterr().out
