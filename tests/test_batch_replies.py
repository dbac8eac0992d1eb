"""Batch mode against result lines of the wrong shape: only their rows fail (``bad_reply``);
the rest of their batch and the other batches are collected, and a rerun does not block."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batcher.cli import main
from batcher.sim.batches import LineRunner
from tests.conftest import SimFactory, reviews, write_job

# What a hostile batch answers for a marked row: a 200 whose body is no chat completion.
WRONG: list[dict[str, Any]] = [
    {"choices": [{"message": "hi"}]},
    {"model": {}, "choices": [{"message": {"content": "x"}, "finish_reason": "stop"}]},
    {"choices": [{"message": {"content": {"an": "object"}}}]},
    {"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": 1e20}},
]


def test_a_malformed_result_line_fails_only_its_row(
    tmp_path: Path, sim_factory: SimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    honest = LineRunner.run

    def hostile(self: LineRunner, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        prompt = body["messages"][-1]["content"]
        if "[[bad]]" in prompt:
            return 200, WRONG[int(prompt.split(":")[0].removeprefix("Review k")) % len(WRONG)]
        return honest(self, body)

    monkeypatch.setattr(LineRunner, "run", hostile)
    data = reviews(30)
    marked = data.with_columns(
        pl.when(pl.col("stars") == 2)
        .then("[[bad]] " + pl.col("text"))
        .otherwise(pl.col("text"))
        .alias("text")
    )
    server = sim_factory()
    job = write_job(
        tmp_path,
        server.url,
        data=marked,
        endpoint={"mode": "batch"},
        batch={"poll_s": 0.1, "max_lines": 10},  # three batches, each with bad lines
        retry={"max_attempts": 1},
    )
    assert main(["run", str(job), "--quiet"]) == 1
    out = pl.read_parquet(tmp_path / "out/result.parquet").sort("id")
    bad = marked["stars"] == 2
    failed = out.filter(pl.col("error").is_not_null())
    assert failed["id"].to_list() == marked.filter(bad)["id"].to_list()
    assert all(e.startswith("bad_reply: ") for e in failed["error"].to_list())
    answered = out.filter(pl.col("error").is_null())
    assert answered.height == 30 - failed.height
    assert answered["response"].null_count() == 0
    assert len(server.simulator.batches.batches) == 3
    # The rerun sends the failed rows again, and ends the same way rather than blocking.
    assert main(["run", str(job), "--quiet"]) == 1
    assert pl.read_parquet(tmp_path / "out/result.parquet").height == 30
