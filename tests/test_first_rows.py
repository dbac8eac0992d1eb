"""A mistake found only by sending stops the run after its first rows (limits.early_stop_rows):
a schema no reply meets, a request the server refuses. Over loopback HTTP to the simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest
from anyio import wait_all_tasks_blocked

from batcher.cli import main
from batcher.errors import FirstRowsFailedError
from batcher.runs.first_rows import FirstRows, mistake_hint
from batcher.runs.stopping import Stopping
from batcher.store.columns import INTERRUPTED, Outcome
from tests.conftest import SimFactory, reviews, write_job

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["label", "score"],
    "additionalProperties": False,
}
JSON_OUTPUT = {"parse": "json", "schema": SCHEMA}
# What a job sends for the server to answer in the schema (batcher sends extra_body as it is).
RESPONSE_FORMAT = {
    "extra_body": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "label", "schema": SCHEMA, "strict": True},
        }
    }
}


def marked(data: pl.DataFrame, marker: str, *, but: int | None = None) -> pl.DataFrame:
    """``data`` with ``marker`` in every row's text, but the row at position ``but``."""
    position = pl.int_range(pl.len())
    mark = pl.lit(True) if but is None else position != but
    text = pl.when(mark).then(marker + " " + pl.col("text")).otherwise(pl.col("text"))
    return data.with_columns(text.alias("text"))


def failed_rows(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(folder / "out/result.parquet").filter(pl.col("error").is_not_null())


def test_a_schema_no_reply_meets_stops_after_the_first_rows(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # The simulator answers free text (no response_format asked): no reply is the JSON the
    # schema wants. Before, all 300 rows were paid for three times: 900 requests, exit 1.
    server = sim_factory()
    job = write_job(
        tmp_path,
        server.url,
        data=reviews(300),
        limits={"concurrency": 64},
        output=JSON_OUTPUT,
    )
    assert main(["run", str(job), "--quiet"]) == 3
    assert server.simulator.requests < 100
    assert server.simulator.requests == 20 * 3  # 20 rows, each its first attempt and 2 more
    stderr = capsys.readouterr().err
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1
    assert stopped[0].startswith("stopped: the first 20 rows sent all failed with invalid_output")
    assert "check output.schema" in stopped[0]
    assert "these rows are sent again" in stopped[0]
    assert f"resume with: batcher run {job} --quiet" in stderr
    failed = failed_rows(tmp_path)  # the output is written, the rows in flight kept
    assert failed.height == 20
    assert failed["error"].str.starts_with("invalid_output: ").all()
    assert pl.read_parquet(tmp_path / "out/result.parquet").height == 20  # the rest: pending


def test_a_request_the_server_refuses_stops_after_the_first_rows(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    data = marked(reviews(300), "[[sim:400]]")
    job = write_job(tmp_path, server.url, data=data, limits={"concurrency": 64})
    assert main(["run", str(job), "--quiet"]) == 3
    assert server.simulator.requests == 20  # a 400 is not retried
    assert "stopped: the first 20 rows sent all failed with http_400" in capsys.readouterr().err


def test_one_success_among_the_first_rows_passes_the_test(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    server = sim_factory()
    data = marked(reviews(300), "[[sim:400]]", but=7)
    job = write_job(tmp_path, server.url, data=data, limits={"concurrency": 64})
    assert main(["run", str(job), "--quiet"]) == 1
    assert server.simulator.requests == 300
    assert failed_rows(tmp_path).height == 299


@pytest.mark.parametrize(
    "storm",
    [
        {"fail_share": 1.0, "faults": ("503",), "fail_attempts_min": 9, "fail_attempts_max": 9},
        {"fail_share": 1.0, "faults": ("drop",), "fail_attempts_min": 9, "fail_attempts_max": 9},
    ],
    ids=["5xx", "connection"],
)
def test_the_servers_failures_never_stop_the_run_early(
    tmp_path: Path, sim_factory: SimFactory, storm: dict[str, Any]
) -> None:
    # (A 429 never ends a row: it is retried until limits.stall_timeout_s stops the run.)
    server = sim_factory(**storm)
    job = write_job(
        tmp_path,
        server.url,
        data=reviews(40),
        retry={"max_attempts": 2, "initial_backoff_s": 0, "max_backoff_s": 0},
    )
    assert main(["run", str(job), "--quiet"]) == 1
    assert server.simulator.requests == 40 * 2  # every row tried to the end of its retries
    assert failed_rows(tmp_path).height == 40


def test_early_stop_rows_0_turns_the_test_off(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory()
    data = marked(reviews(40), "[[sim:400]]")
    job = write_job(tmp_path, server.url, data=data, limits={"early_stop_rows": 0})
    assert main(["run", str(job), "--quiet"]) == 1
    assert server.simulator.requests == 40


def test_a_resumed_job_tests_its_own_first_rows_and_the_rerun_sends_them_again(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    simulator = server.simulator
    job = write_job(
        tmp_path,
        server.url,
        data=reviews(300),
        request=RESPONSE_FORMAT,
        output=JSON_OUTPUT,
    )
    assert main(["run", str(job), "--quiet", "--limit", "30"]) == 0
    assert simulator.requests == 30
    # The server goes wrong: the 30 rows answered before are not this run's, so they do not
    # pass its test; the next 20 rows fail it.
    simulator.settings.schema_violation_share = 1.0
    simulator.reset()
    assert main(["run", str(job), "--quiet"]) == 3
    assert simulator.requests == 20 * 3
    assert "failed with invalid_output" in capsys.readouterr().err
    assert failed_rows(tmp_path).height == 20
    # Fixed: the rerun sends the 20 failed rows again, and the 250 never sent.
    simulator.settings.schema_violation_share = 0.0
    simulator.reset()
    assert main(["run", str(job), "--quiet"]) == 0
    assert simulator.requests == 270
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["error"].null_count() == 300


def test_batch_mode_stops_submitting_once_its_first_results_fail(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # 40 rows refused (400), 20 whose first submission fails with a 500: those would go in a
    # new batch; once the first results failed the test, nothing more is submitted.
    server = sim_factory(batch_fail_share=1.0)
    data = reviews(60)
    refused = pl.when(pl.int_range(pl.len()) < 40).then("[[sim:400]] " + pl.col("text"))
    data = data.with_columns(refused.otherwise(pl.col("text")).alias("text"))
    job = write_job(
        tmp_path, server.url, data=data, endpoint={"mode": "batch"}, batch={"poll_s": 0.05}
    )
    assert main(["run", str(job), "--quiet"]) == 3
    assert "stopped: the first 20 rows sent all failed with http_400" in capsys.readouterr().err
    assert sum(server.simulator.batches.lines.line_attempts.values()) == 60  # one batch only
    assert len(server.simulator.batches.batches) == 1
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.height == 40  # the 20 rows to retry are pending for the next run
    assert out["error"].str.starts_with("http_400: ").all()


def test_a_negative_early_stop_rows_is_refused(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url, limits={"early_stop_rows": -1})
    assert main(["run", str(job), "--quiet"]) == 2
    assert server.simulator.requests == 0


def _outcome(kind: str | None, key: int = 0) -> Outcome:
    if kind is None:
        return Outcome(key, b"", ok=True)
    return Outcome.failed(key, b"", kind, "why", input_digest=None, attempts=1)


@pytest.mark.parametrize(
    ("kinds", "stops"),
    [
        (["invalid_output"] * 3, True),
        (["finish_reason"] * 3, True),
        (["http_422"] * 3, True),
        (["invalid_output", None, "invalid_output", "invalid_output"], False),
        (["invalid_output", "http_400", "invalid_output", "invalid_output"], False),
        (["http_400", "http_503", "http_400", "http_400"], False),
        (["http_400", INTERRUPTED, "http_400", "http_400"], True),
        (["timeout", "connection", "http_429", "image_error"], False),
    ],
)
@pytest.mark.anyio
async def test_the_test_of_the_first_rows(kinds: list[str | None], stops: bool) -> None:
    stopping = Stopping(lambda _line: None)
    first = FirstRows(3, stopping)
    for key, kind in enumerate(kinds):
        first.settled(_outcome(kind, key))
    assert isinstance(stopping.abort, FirstRowsFailedError) is stops
    assert stopping.stopping is stops


def test_which_kinds_are_mistakes_in_the_job() -> None:
    for kind in ("invalid_output", "finish_reason", "http_400", "http_404", "http_413", "http_422"):
        assert mistake_hint(kind) is not None, kind
    for kind in ("http_429", "http_408", "http_409", "http_500", "http_503", "timeout"):
        assert mistake_hint(kind) is None, kind
    for kind in ("connection", "invalid_json", "no_choices", "image_error", "deadline"):
        assert mistake_hint(kind) is None, kind


@pytest.mark.anyio
async def test_rows_after_the_first_wait_for_the_verdict() -> None:
    stopping = Stopping(lambda _line: None)
    first = FirstRows(2, stopping)
    handed: list[int] = []

    async def hand_out(row: int) -> None:
        await first.admit()
        handed.append(row)

    async with anyio.create_task_group() as rows:
        for row in range(4):
            rows.start_soon(hand_out, row)
        await wait_all_tasks_blocked()
        assert len(handed) == 2  # the rows after the first two wait while those are out
        first.settled(_outcome(None))  # one success: every row goes from now on
    assert len(handed) == 4
    assert stopping.abort is None
