"""Truncation as failure (output.fail_on_finish) and redoing only what failed (--keep-done)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from batcher.cli import main
from batcher.sim import SimulatorThread
from tests.conftest import write_job
from tests.test_models import requests_seen

SHORT_MAX_TOKENS = 18  # the simulator's long replies run to about 23 tokens, short ones to 15


def mixed_reviews(count: int) -> pl.DataFrame:
    """Even rows get a short reply from the simulator, odd rows a long one."""
    return pl.DataFrame(
        {
            "id": [f"k{i:05d}" for i in range(count)],
            "text": [
                "ok" if i % 2 == 0 else "a very much longer review text with many words"
                for i in range(count)
            ],
        }
    )


def test_truncated_rows_fail_then_keep_done_sends_only_them(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    data = mixed_reviews(20)
    odd = [f"k{i:05d}" for i in range(1, 20, 2)]
    job = write_job(
        tmp_path,
        sim.url,
        data=data,
        request={"max_tokens": SHORT_MAX_TOKENS},
        output={"fail_on_finish": ["length"]},
    )
    assert main(["run", str(job), "--quiet"]) == 1
    assert requests_seen(sim.url) == 20  # a truncated reply is not retried
    first = pl.read_parquet(tmp_path / "out/result.parquet")
    failed = first.filter(pl.col("error").is_not_null())
    assert failed["id"].to_list() == odd
    assert failed["error"].unique().to_list() == ["finish_reason: length"]
    assert failed["finish_reason"].unique().to_list() == ["length"]
    assert failed["attempts"].unique().to_list() == [1]
    # The truncated text is kept, and it was paid for.
    assert failed["response"].str.starts_with("Simulated reply").all()
    assert (failed["cost_usd"] > 0).all()

    rerun = ["run", str(job), "--quiet", "--set", "request.max_tokens=64", "--keep-done"]
    assert main(rerun) == 0
    assert requests_seen(sim.url) == 20 + len(odd)
    second = pl.read_parquet(tmp_path / "out/result.parquet")
    assert second["id"].to_list() == data["id"].to_list()
    assert second["error"].null_count() == 20
    assert second["finish_reason"].unique().to_list() == ["stop"]
    # The rows answered before are kept as they were, although their request changed.
    done = first.filter(pl.col("error").is_null()).select("id", "response", "response_id")
    assert second.filter(pl.col("id").is_in(done["id"].implode())).select(done.columns).equals(done)

    # Without --keep-done the new max_tokens changes every request: all are sent again.
    assert main(["run", str(job), "--quiet", "--set", "request.max_tokens=64"]) == 0
    assert requests_seen(sim.url) == 20 + len(odd) + 10


def test_truncation_is_success_by_default(tmp_path: Path, sim: SimulatorThread) -> None:
    job = write_job(
        tmp_path, sim.url, data=mixed_reviews(6), request={"max_tokens": SHORT_MAX_TOKENS}
    )
    assert main(["run", str(job), "--quiet"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["finish_reason"].to_list() == ["stop", "length"] * 3
    assert out["error"].null_count() == 6


def test_fail_on_finish_with_keep_done_and_model_list(tmp_path: Path, sim: SimulatorThread) -> None:
    job = write_job(
        tmp_path,
        sim.url,
        data=mixed_reviews(6),
        request={
            "max_tokens": SHORT_MAX_TOKENS,
            "model": ["claude-3-5-haiku-20241022", "claude-sonnet-4-20250514"],
        },
        output={"fail_on_finish": ["length", "content_filter"]},
    )
    assert main(["run", str(job), "--quiet"]) == 1
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["error"].null_count() == 6  # odd rows fail for both models
    assert main(["run", str(job), "--quiet", "--set", "request.max_tokens=64", "--keep-done"]) == 0
    assert requests_seen(sim.url) == 12 + 6
