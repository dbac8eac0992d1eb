"""Pre-flight: input columns that clash with the output, budgets without a price, and command
arguments; every one answered on one line before a request is sent."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from batcher.cli import main
from batcher.sim import SimulatorThread
from batcher.store.columns import COLUMN_NAMES
from tests.conftest import reviews, write_job

OUTPUT_NAMES = [
    "response",
    "finish_reason",
    "model",
    "prompt_tokens",
    "cost_usd",
    "attempts",
    "error",
    "response_id",
    "tool_calls",
    "reasoning",
]
INTERNAL_NAMES = sorted({*COLUMN_NAMES, "__key", "__current"} - set(OUTPUT_NAMES))


def refused(job: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(["run", str(job), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert sim.simulator.requests == 0
    return err


@pytest.mark.parametrize("column", OUTPUT_NAMES + INTERNAL_NAMES)
def test_a_kept_column_named_like_an_output_column_is_refused(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str], column: str
) -> None:
    data = reviews(5).with_columns(pl.lit("x").alias(column))
    job = write_job(tmp_path, sim.url, data=data)
    err = refused(job, sim, capsys)
    assert f"input column(s) {column!r} have the names of output columns" in err
    assert "output.keep_columns" in err


def test_an_id_column_named_like_an_output_column_is_refused(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    data = reviews(5).rename({"id": "error"})
    job = write_job(
        tmp_path,
        sim.url,
        data=data,
        input={"id_column": "error"},
        request={"prompt": "{{ text }}"},
    )
    assert "input.id_column 'error' has the name of an output column" in refused(job, sim, capsys)


def test_clashing_columns_left_out_of_the_output_work(tmp_path: Path, sim: SimulatorThread) -> None:
    """`ok` and `model` feed the template but are not kept: the output and summary are right."""
    data = reviews(6).with_columns(
        pl.lit("claimed").alias("model"), pl.Series("ok", [0, 1, 0, 1, 0, 1])
    )
    job = write_job(
        tmp_path,
        sim.url,
        data=data,
        request={"prompt": "{{ text }} {{ model }} {{ ok }}"},
        output={"keep_columns": ["title"]},
    )
    assert main(["run", str(job), "--quiet"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.columns[:3] == ["id", "title", "response"]
    assert out["model"].unique().to_list() == ["claude-3-5-haiku-20241022"]
    assert out["error"].null_count() == 6
    assert "review number 1 says good things claimed 1" in sim.simulator.usage_by_prompt


def test_an_ok_column_cannot_corrupt_the_summary(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    """The template reads `ok`; the rebuild's join must count the journal's, not the input's."""
    data = reviews(3).with_columns(pl.lit(0).alias("ok"))
    job = write_job(
        tmp_path,
        sim.url,
        data=data,
        request={"prompt": "{{ text }} {{ ok }}"},
        output={"keep_columns": ["title"]},
    )
    assert main(["run", str(job), "--quiet"]) == 0
    assert "rows: 3 ok, 0 failed" in capsys.readouterr().err


def test_a_budget_needs_a_price(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    request = {"model": "claude-3-5-haiku-latest"}
    job = write_job(tmp_path, sim.url, request=request, limits={"max_cost_usd": 0.01})
    err = refused(job, sim, capsys)
    assert "limits.max_cost_usd: model claude-3-5-haiku-latest has no price" in err
    assert "add it under prices:" in err

    priced = {"claude-3-5-haiku-latest": {"input": 0.8, "output": 4.0}}
    job = write_job(tmp_path, sim.url, request=request, limits={"max_cost_usd": 10}, prices=priced)
    assert main(["run", str(job), "--quiet"]) == 0


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["run", "JOB", "--limit", "-1"], "argument --limit: must be 0 to 4294967295"),
        (["status", "JOB", "--limit", "-1"], "argument --limit: must be 0 to 4294967295"),
        (["estimate", "JOB", "--limit", "-1"], "argument --limit: must be 0 to 4294967295"),
        (["run", "JOB", "--limit", "9" * 30], "argument --limit: must be 0 to 4294967295"),
        (["estimate", "JOB", "--limit", str(2**32)], "argument --limit: must be 0 to 4294967295"),
        (["estimate", "JOB", "--sample", "-5"], "argument --sample: must be 0 to 4294967295"),
        (["estimate", "JOB", "--sample", "some"], "argument --sample: not a whole number"),
        (["sim", "--fail-attempts", "x"], "argument --fail-attempts: expected N or MIN-MAX"),
        (["sim", "--fail-attempts", "3-1"], "expected 1 <= MIN <= MAX"),
    ],
)
def test_bad_arguments_are_one_line(
    tmp_path: Path,
    sim: SimulatorThread,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    expected: str,
) -> None:
    job = write_job(tmp_path, sim.url)
    assert main([str(job) if a == "JOB" else a for a in arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: batcher ")
    assert expected in err
    assert err.count("\n") == 1
    assert sim.simulator.requests == 0


def test_sim_on_a_busy_port_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["sim", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: sim: cannot listen on 127.0.0.1:{port}: ")
    assert err.count("\n") == 1


def test_python_dash_m_batcher(tmp_path: Path, sim: SimulatorThread) -> None:
    job = write_job(tmp_path, sim.url)
    done = subprocess.run(
        [sys.executable, "-m", "batcher", "estimate", str(job), "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert '"rows":20' in done.stdout


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"models: [unclosed\n", "not valid YAML: line 2, column 1:"),
        (b"models:\n  a: {input: 1, output: 1}\n  a: {input: 2, output: 2}\n", "duplicate key 'a'"),
        (b"models: {}\n# caf\xe9\n", "not UTF-8 text"),
    ],
)
def test_a_bad_price_file_is_one_line(
    tmp_path: Path,
    sim: SimulatorThread,
    capsys: pytest.CaptureFixture[str],
    content: bytes,
    expected: str,
) -> None:
    table = tmp_path / "prices.yaml"
    table.write_bytes(content)
    job = write_job(tmp_path, sim.url)
    assert main(["run", str(job), "--quiet", "--prices", str(table)]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1
    assert sim.simulator.requests == 0
