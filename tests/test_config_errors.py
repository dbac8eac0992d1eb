"""Every mistake in a job file or its input: exit 2, one clear message, zero requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batcher.cli import main
from batcher.sim import SimulatorThread
from tests.conftest import reviews, write_job


def fails_before_sending(
    job: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str], *extra: str
) -> str:
    code = main(["run", str(job), "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ")
    assert "Traceback" not in err
    assert sim.simulator.requests == 0
    return err


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"limits": {"concurency": 4}}, "limits.concurency: unknown key"),
        ({"limits": {"concurrency": "many"}}, "limits.concurrency"),
        ({"request": {"temperature": 3}}, "request.temperature"),
        ({"request": {"top_p": -0.1}}, "request.top_p"),
        ({"request": {"stop": ["a", "b", "c", "d", "e"]}}, "request.stop"),
        ({"request": {"reasoning_effort": "extreme"}}, "request.reasoning_effort"),
        ({"request": {"prompt": "{{ missing_column }}"}}, "missing_column"),
        ({"request": {"prompt": "{{ text "}}, "request.prompt: template error"),
        ({"input": {"id_column": "nope"}}, "input.id_column 'nope'"),
        ({"input": {"path": "absent.csv"}}, "input file not found"),
        ({"output": {"keep_columns": ["ghost"]}}, "ghost"),
        ({"request": {"images": ["photo"]}}, "request.images names column 'photo'"),
        ({"surprise": 1}, "surprise: unknown key"),
        ({"limits": {"concurrency": True}}, "limits.concurrency: takes auto or a whole number"),
        ({"request": {"stream": 1}}, "request.stream: Input should be a valid boolean"),
        ({"request": {"model": ""}}, "request.model: a model name cannot be empty"),
        ({"output": {"path": "x.csv"}}, "output.path: must end in .parquet"),
        ({"output": {"parse": "json", "schema": {}}}, "output.schema: is empty"),
        ({"endpoint": {"base_url": ""}}, "endpoint.base_url: must start with http://"),
        ({"endpoint": {"base_url": "ftp://host/v1"}}, "endpoint.base_url: must start with"),
        ({"endpoint": {"base_url": "localhost:8000/v1"}}, "endpoint.base_url: must start with"),
        ({"endpoint": {"base_url": "http://127.0.0.1: 80/v1"}}, "must not contain spaces"),
        ({"endpoint": {"base_url": "http://127.0.0.1:99999/v1"}}, "has an invalid port"),
        ({"endpoint": {"base_url": "http:///v1"}}, "endpoint.base_url: has no host name"),
        (
            {"retry": {"initial_backoff_s": 2, "max_backoff_s": 1}},
            "retry: max_backoff_s (1) is below initial_backoff_s (2)",
        ),
        ({"input": {"dtypes": {"stars": "integer"}}}, "input.dtypes.stars"),
        ({"input": {"dtypes": {"ghost": "int64"}}}, "input.dtypes names column 'ghost'"),
        ({"input": {"allow_nulls": "yes"}}, "input.allow_nulls"),
        ({"images": {"allow_outside_root": 1}}, "images.allow_outside_root"),
        ({"request": {"prompt": "{{ text.foo.bar }}"}}, "request.prompt: rendering the input"),
        (
            {"request": {"model": "claude-3-5-haiku-latest"}, "limits": {"max_cost_usd": 0.01}},
            "add it under prices:",
        ),
    ],
)
def test_configuration_errors(
    tmp_path: Path,
    sim: SimulatorThread,
    capsys: pytest.CaptureFixture[str],
    sections: dict[str, Any],
    expected: str,
) -> None:
    job = write_job(tmp_path, sim.url, **sections)
    err = fails_before_sending(job, sim, capsys)
    assert expected in err
    # One line that says where: the job file, the input file, or the input key it names.
    where = (f"error: {job}: ", f"error: {tmp_path / 'data.csv'}: ", "error: input.path: ")
    assert err.startswith(where), err


def test_missing_required_key(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: x\ninput: {path: data.csv}\n")
    err = fails_before_sending(job, sim, capsys)
    assert "request: required key is missing" in err


def test_duplicate_id_column(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    data = reviews(10).with_columns(pl.lit("same").alias("id"))
    job = write_job(tmp_path, sim.url, data=data)
    assert "is not unique" in fails_before_sending(job, sim, capsys)


def test_empty_id(tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]) -> None:
    data = reviews(10).with_columns(
        pl.when(pl.col("stars") == 1).then(None).otherwise(pl.col("id")).alias("id")
    )
    job = write_job(tmp_path, sim.url, data=data)
    assert "is empty on" in fails_before_sending(job, sim, capsys)


def test_unreadable_csv(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data.csv").write_bytes(b'id,text\n"unterminated,\x00\xff\n1,2,3,4,5\n')
    job = write_job(tmp_path, sim.url)
    err = fails_before_sending(job, sim, capsys)
    assert "data.csv" in err


def test_not_yaml(tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: [unclosed\n")
    err = fails_before_sending(job, sim, capsys)
    assert "not valid YAML: line 2, column 1: expected ','" in err
    assert err.count("\n") == 1


def test_duplicate_yaml_key(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, sim.url)
    job.write_text(job.read_text() + "name: second\n")
    err = fails_before_sending(job, sim, capsys)
    assert "duplicate key 'name'" in err
    assert err.count("\n") == 1


def test_not_utf8(tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path, sim.url)
    job.write_bytes(job.read_bytes() + b"# caf\xe9\n")
    err = fails_before_sending(job, sim, capsys)
    assert "not UTF-8 text (byte 0xe9" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b", ""])
def test_name_is_a_plain_file_name(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    job = write_job(tmp_path, sim.url)
    err = fails_before_sending(job, sim, capsys, "--set", f"name={name}")
    assert "name: must be a plain file name" in err


def test_override_substitutes_environment(
    tmp_path: Path,
    sim: SimulatorThread,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BATCHER_TEST_NAME", "../escape")
    job = write_job(tmp_path, sim.url)
    err = fails_before_sending(job, sim, capsys, "--set", "name=${BATCHER_TEST_NAME}")
    assert "(got '../escape')" in err
    monkeypatch.delenv("BATCHER_TEST_NAME")
    err = fails_before_sending(job, sim, capsys, "--set", "name=${BATCHER_TEST_NAME}")
    assert "name: environment variable BATCHER_TEST_NAME is not set" in err


def test_missing_job_file(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "job file not found" in fails_before_sending(tmp_path / "nope.yaml", sim, capsys)


def test_unset_environment_variable(
    tmp_path: Path,
    sim: SimulatorThread,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    job = write_job(tmp_path, sim.url, request={"model": "${NOT_SET_ANYWHERE}"})
    err = fails_before_sending(job, sim, capsys)
    assert "request.model: environment variable NOT_SET_ANYWHERE is not set" in err


def test_bad_override(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, sim.url)
    err = fails_before_sending(job, sim, capsys, "--set", "limits.concurrency=0")
    assert "limits.concurrency" in err
    err = fails_before_sending(job, sim, capsys, "--set", "no-equals-sign")
    assert "expected dotted.key=value" in err


def test_missing_key_for_remote_endpoint(
    tmp_path: Path,
    sim: SimulatorThread,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BATCHER_API_KEY", raising=False)
    job = write_job(tmp_path, "https://gateway.theturbo.ai/v1")
    err = fails_before_sending(job, sim, capsys)
    assert "BATCHER_API_KEY is not set" in err
