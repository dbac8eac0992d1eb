"""Batch mode: the same job through the simulator's Batch API, over loopback HTTP."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest
from PIL import Image

from batcher.cli import main
from batcher.config import load_job
from batcher.errors import AccountError
from batcher.rows.plan import plan_job
from batcher.runs.batch import results
from batcher.runs.batch.book import BatchBook, BookRow
from batcher.runs.batch.lines import ChunkWriter, LineRow, custom_id, encode_line
from batcher.runs.batch.results import Collector, read_results
from batcher.send.budget import upper_cost
from batcher.send.outcome import UNMETERED, OutcomeBuilder
from batcher.send.parse import OutputParser
from batcher.send.prices import PriceTable
from batcher.send.tally import Tally
from batcher.sim import SimulatorThread
from tests.conftest import MODEL, prompt_of, reviews, start, wait_for, write_job

COMPARED = ["id", "response", "finish_reason", "prompt_tokens", "completion_tokens", "error"]


def batch_job(
    folder: Path, url: str, data: pl.DataFrame, limits: dict[str, Any] | None = None, **batch: Any
) -> Path:
    settings = {"poll_s": 0.2, **batch}
    return write_job(
        folder, url, data=data, endpoint={"mode": "batch"}, batch=settings, limits=limits or {}
    )


def row_of(identifier: str) -> str:
    """The row part of a custom_id (the rest counts its submissions)."""
    return identifier.rsplit("-", 1)[0]


def test_custom_ids_are_unique_and_valid_everywhere() -> None:
    keys: list[Any] = [0, 1, "0", "a key with spaces/and+symbols", "é" * 500, None]
    ids = [custom_id(key, n) for key in keys for n in (1, 2, 12)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", i) for i in ids)


def test_thousand_rows_with_line_failures_and_an_expired_batch(
    tmp_path: Path, sim_factory: Any
) -> None:
    data = reviews(1000)
    server = sim_factory(batch_fail_share=0.05, batch_expire=(2,), seed=3)
    job = batch_job(tmp_path, server.url, data, max_lines=250)
    assert main(["run", str(job), "--quiet"]) == 0
    output = pl.read_parquet(tmp_path / "out/result.parquet")
    service = server.simulator.batches

    # Every row answered exactly once, in input order.
    assert output.get_column("id").to_list() == data.get_column("id").to_list()
    assert output.get_column("error").null_count() == 1000
    answered = service.answered_by_prompt
    assert len(answered) == 1000
    assert set(answered.values()) == {1}
    assert all(lines <= 250 for lines in service.batch_lines)
    assert service.batch_lines[:4] == [250, 250, 250, 250]

    # Only failed or expired lines were resubmitted, and `attempts` counts submissions.
    submissions: dict[str, list[str]] = {}
    for identifier in sorted(service.uploaded, key=lambda i: int(i.rsplit("-", 1)[1])):
        assert service.uploaded[identifier] == 1
        submissions.setdefault(row_of(identifier), []).append(identifier)
    fates = service.fates
    expired = [i for i, fate in fates.items() if fate == "expired"]
    failed = [i for i, fate in fates.items() if fate == "500"]
    assert len(expired) == 125
    assert 20 <= len(failed) <= 90
    for tries in submissions.values():
        assert all(fates[i] in ("500", "expired") for i in tries[:-1])
        assert fates[tries[-1]] == "ok"
    resubmitted = {r for r, tries in submissions.items() if len(tries) > 1}
    assert resubmitted == {row_of(i) for i in expired + failed}
    attempts = dict(zip(data.get_column("id"), output.get_column("attempts"), strict=True))
    by_row = {custom_id(k, 1).rsplit("-", 1)[0]: k for k in data.get_column("id")}
    for row, tries in submissions.items():
        assert attempts[by_row[row]] == len(tries)

    # cost_usd is half of the live price for the same tokens.
    live_folder = tmp_path / "live"
    live_folder.mkdir()
    live_server = sim_factory()
    live_job = write_job(live_folder, live_server.url, data=data)
    assert main(["run", str(live_job), "--quiet"]) == 0
    live = pl.read_parquet(live_folder / "out/result.parquet")
    for column in ("prompt_tokens", "completion_tokens", "response"):
        assert output.get_column(column).to_list() == live.get_column(column).to_list()
    price = PriceTable.load().get(MODEL)
    assert price is not None
    rows = zip(output.iter_rows(named=True), live.iter_rows(named=True), strict=True)
    for batch_row, live_row in rows:
        list_cost = price.cost(batch_row["prompt_tokens"], batch_row["completion_tokens"])
        assert live_row["cost_usd"] == pytest.approx(list_cost)
        assert batch_row["cost_usd"] == pytest.approx(list_cost / 2)


def test_sigkill_after_submission_then_rerun(tmp_path: Path, sim_factory: Any) -> None:
    data = reviews(600)
    baseline_folder = tmp_path / "baseline"
    baseline_folder.mkdir()
    baseline = sim_factory()
    assert main(["run", str(batch_job(baseline_folder, baseline.url, data, max_lines=100))]) == 0
    expected = pl.read_parquet(baseline_folder / "out/result.parquet").select(COMPARED)

    server = sim_factory(batch_delay_s=1.5)
    job = batch_job(tmp_path, server.url, data, max_lines=100)
    process = start(job, capture=False)
    service = server.simulator.batches
    wait_for(lambda: len(service.batches) == 6 or process.poll() is not None)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(service.batches) == 6, "killed too late: the run had ended"
    status = subprocess.run(
        [sys.executable, "-m", "batcher.cli", "status", str(job)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "batches in flight: 6" in status.stdout

    assert main(["run", str(job), "--quiet"]) == 0
    result = pl.read_parquet(tmp_path / "out/result.parquet").select(COMPARED)
    assert result.equals(expected)
    # The rerun re-attached to the six batches: no line was uploaded twice.
    assert len(service.batches) == 6
    assert len(service.uploaded) == 600
    assert set(service.uploaded.values()) == {1}
    assert len({row_of(i) for i in service.uploaded}) == 600


def test_a_file_over_max_bytes_is_never_uploaded(tmp_path: Path, sim_factory: Any) -> None:
    data = reviews(120).with_columns(
        pl.when(pl.col("id") == "k00007")
        .then(pl.lit("x" * 5000))
        .when(pl.col("id") == "k00011")
        .then(pl.lit("[[sim:400]] refused"))
        .otherwise(pl.col("text"))
        .alias("text")
    )
    server = sim_factory()
    job = batch_job(tmp_path, server.url, data, max_bytes=4096)
    assert main(["run", str(job), "--quiet"]) == 1
    service = server.simulator.batches
    assert len(service.file_sizes) > 5
    assert max(service.file_sizes) <= 4096
    output = pl.read_parquet(tmp_path / "out/result.parquet")
    errors = dict(zip(output.get_column("id"), output.get_column("error"), strict=True))
    # A single line over the limit fails its row and is never sent.
    assert errors["k00007"].startswith("too_large: the request is")
    assert prompt_of("k00007", "x" * 5000) not in service.uploaded_prompts
    # A 4xx line fails its row with the server's message, at once.
    assert errors["k00011"] == "http_400: messages: this request was refused as invalid"
    attempts = dict(zip(output.get_column("id"), output.get_column("attempts"), strict=True))
    assert attempts["k00011"] == 1
    assert sum(e is None for e in errors.values()) == 118


@pytest.mark.parametrize(
    "limits", [{"batch_max_lines": 40}, {"batch_max_file_bytes": 6000}], ids=["lines", "bytes"]
)
def test_a_batch_the_server_refuses_as_too_large_is_split(
    tmp_path: Path, sim_factory: Any, limits: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    data = reviews(200)
    server = sim_factory(**limits)
    job = batch_job(tmp_path, server.url, data, max_lines=100)
    assert main(["run", str(job), "--quiet"]) == 0
    service = server.simulator.batches
    assert service.refused_batches + service.refused_uploads >= 1
    assert "splitting into batches" in capsys.readouterr().err
    if "batch_max_lines" in limits:
        assert max(service.batch_lines) <= 40
    else:
        assert max(service.file_sizes) <= 6000
    assert sum(service.batch_lines) == 200  # every row ran in exactly one created batch
    assert set(service.answered_by_prompt.values()) == {1}
    output = pl.read_parquet(tmp_path / "out/result.parquet")
    assert output.get_column("error").null_count() == 200
    assert set(output.get_column("attempts").to_list()) == {1}


def test_an_endpoint_without_batch_api_is_exit_2_before_any_row(
    tmp_path: Path, sim_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory(batch_api=False)
    job = batch_job(tmp_path, server.url, reviews(20))
    assert main(["run", str(job), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {job}: endpoint.mode: ")
    assert "does not serve the Batch API" in error
    assert "endpoint.mode: live" in error
    assert "\n" not in error
    assert server.simulator.requests == 0
    assert not server.simulator.batches.uploaded


def test_budget_holds_each_line_at_its_worst_case_and_waits_for_batches_in_flight(
    tmp_path: Path, sim_factory: Any
) -> None:
    """Lines are submitted while their worst cases fit beside the batches in flight; when the
    next does not, filling waits for those batches to end (their real cost is far below
    what they held) and goes on; the run stops only when a line does not fit with none in
    flight."""
    data = reviews(300)
    server = sim_factory()
    cap = 0.004
    job = batch_job(tmp_path, server.url, data, {"max_cost_usd": cap}, max_lines=50)
    assert main(["run", str(job), "--quiet"]) == 3
    service = server.simulator.batches
    sent = len(service.uploaded)
    assert 0 < sent < 300
    assert len(service.batches) >= 2  # more rounds than what fitted at first
    rows = list(data.iter_rows(named=True))
    assert [prompt_of(r["id"], r["text"]) for r in rows[:sent]] == list(service.uploaded_prompts)
    output = pl.read_parquet(tmp_path / "out/result.parquet")
    assert output.height == sent
    spent = float(output.get_column("cost_usd").sum())
    assert spent <= cap
    price = PriceTable.load().get(MODEL)
    assert price is not None
    plan = plan_job(job)
    after = plan.builder.build(rows[sent]["id"], rows[sent])
    assert cap - spent < upper_cost(price.for_batch(), after)  # the next could not fit


def test_interrupt_leaves_batches_running_and_cancel_stops_them(
    tmp_path: Path, sim_factory: Any
) -> None:
    data = reviews(90)
    server = sim_factory(batch_delay_s=60)
    job = batch_job(tmp_path, server.url, data, max_lines=30)
    service = server.simulator.batches
    process = start(job)
    wait_for(lambda: len(service.batches) == 3 or process.poll() is not None)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 3
    assert "3 batch(es) keep running on the server" in stderr.decode()
    assert "batcher cancel" in stderr.decode()
    assert service.stats()["statuses"] == {"in_progress": 3}

    assert main(["cancel", str(job), "--quiet"]) == 0
    assert service.cancel_requests == 3
    assert service.stats()["statuses"] == {"cancelled": 3}
    output = pl.read_parquet(tmp_path / "out/result.parquet")
    assert output.height == 0  # cancelled lines are pending, not failed

    # Cancelled on purpose: not counted as attempts, submitted again by the next run.
    server.simulator.settings.batch_delay_s = 0
    assert main(["run", str(job), "--quiet"]) == 0
    output = pl.read_parquet(tmp_path / "out/result.parquet")
    assert output.get_column("error").null_count() == 90
    assert set(output.get_column("attempts").to_list()) == {1}
    assert Counter(service.uploaded.values()) == {1: 180}


def test_batch_mode_refuses_what_the_batch_api_cannot_do(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    job = batch_job(tmp_path, sim.url, reviews(5))
    assert main(["run", str(job), "--quiet", "--set", "request.stream=true"]) == 2
    assert f"error: {job}: request.stream: the Batch API does not stream" in capsys.readouterr().err
    assert main(["run", str(job), "--set", "batch.max_lines=50001"]) == 2
    assert "batch.max_lines" in capsys.readouterr().err
    assert sim.simulator.requests == 0
    assert not sim.simulator.batches.uploaded


def test_estimate_shows_live_and_batch_cost(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, sim.url, data=reviews(50))
    assert main(["estimate", str(job), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    for name in ("low", "expected", "high"):
        assert figures[f"batch_{name}_usd"] == pytest.approx(figures[f"{name}_usd"] / 2)
    assert main(["estimate", str(job)]) == 0
    text = capsys.readouterr().out
    assert "cost, live:" in text
    assert "cost, batch:" in text


@pytest.mark.parametrize("moment", ["upload", "create"])
def test_sigkill_before_the_server_answers_never_uploads_twice(
    tmp_path: Path, sim_factory: Any, moment: str
) -> None:
    """Killed after the server stored a file (or a batch) but before the reply was journaled:
    the rerun finds it by name (or metadata) instead of uploading (or creating) it again."""
    data = reviews(300)
    server = sim_factory(batch_reply_delay_s=3)
    service = server.simulator.batches
    job = batch_job(tmp_path, server.url, data, max_lines=100)
    process = start(job, capture=False)
    stored = service.file_objects if moment == "upload" else service.batches
    wait_for(lambda: len(stored) >= 1 or process.poll() is not None)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(service.file_objects) == 1
    assert len(service.batches) == (1 if moment == "create" else 0)

    server.simulator.settings.batch_reply_delay_s = 0
    assert main(["run", str(job), "--quiet"]) == 0
    output = pl.read_parquet(tmp_path / "out/result.parquet")
    assert output.get_column("error").null_count() == 300
    assert len(service.batches) == 3
    assert len(service.uploaded) == 300
    assert set(service.uploaded.values()) == {1}
    assert set(service.answered_by_prompt.values()) == {1}


def test_a_lost_reply_is_not_retried_blindly(tmp_path: Path, sim_factory: Any) -> None:
    """Uploads and creates whose replies time out are looked up before they are retried."""
    data = reviews(200)
    server = sim_factory(batch_reply_delay_s=1.0)
    service = server.simulator.batches
    job = batch_job(tmp_path, server.url, data, max_lines=100)
    assert main(["run", str(job), "--quiet", "--set", "endpoint.timeout_s=0.3"]) == 0
    assert len(service.file_objects) == 2 + 2  # two inputs, two outputs
    assert len(service.batches) == 2
    assert set(service.uploaded.values()) == {1}
    assert set(service.answered_by_prompt.values()) == {1}


def test_a_line_refused_for_credit_stops_submitting_and_stays_pending(
    tmp_path: Path, sim_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data = reviews(20).with_columns(
        pl.when(pl.col("id") == "k00004")
        .then(pl.lit("[[sim:402]] no money"))
        .otherwise(pl.col("text"))
        .alias("text")
    )
    server = sim_factory()
    job = batch_job(tmp_path, server.url, data)
    assert main(["run", str(job), "--quiet"]) == 3
    assert "the account cannot pay" in capsys.readouterr().err
    output = pl.read_parquet(tmp_path / "out/result.parquet")
    assert output.height == 19
    assert "k00004" not in output.get_column("id").to_list()
    assert len(server.simulator.batches.batches) == 1  # not resubmitted


def test_images_go_inline_in_batch_lines(tmp_path: Path, sim_factory: Any) -> None:
    for number in range(4):
        Image.new("RGB", (64 + number, 48), (number * 60, 90, 160)).save(tmp_path / f"{number}.png")
    data = pl.DataFrame(
        {"id": [f"p{n}" for n in range(4)], "photo": [f"{n}.png" for n in range(4)]}
    )
    server = sim_factory()
    job = write_job(
        tmp_path,
        server.url,
        data=data,
        endpoint={"mode": "batch"},
        batch={"poll_s": 0.2},
        request={"prompt": "Caption {{ id }}", "images": ["photo"]},
    )
    assert main(["run", str(job), "--quiet"]) == 0
    seen = server.simulator.images
    assert [(image["decoded"], image["width"]) for image in seen] == [
        ("image/png", 64 + n) for n in range(4)
    ]
    output = pl.read_parquet(tmp_path / "out/result.parquet")
    assert output.get_column("error").null_count() == 4


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_batches_and_rows_by_state(
    tmp_path: Path, sim_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    server = sim_factory(batch_delay_s=0.5, batch_expire=(1,))
    job = batch_job(tmp_path, server.url, reviews(40), max_lines=20, poll_s=0.1)
    assert main(["run", str(job)]) == 0
    text = screen.getvalue()
    assert "batches: in_progress=2 | rows: submitted=40 retry=0 ok=0" in text
    # The expired half of the first batch, in a batch of its own.
    assert "batches: in_progress=1 | rows: submitted=10 retry=0 ok=30" in text
    assert "40/40" in text


def test_simulate_runs_batch_mode_in_process(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        "http://unused.invalid/v1",
        data=reviews(30),
        endpoint={"mode": "batch"},
        batch={"poll_s": 0.1, "max_lines": 7},
    )
    assert main(["run", str(job), "--simulate", "--quiet"]) == 0
    output = pl.read_parquet(tmp_path / "out/result.parquet")
    assert output.get_column("error").null_count() == 30


def test_cancel_is_for_batch_mode(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, sim.url)
    assert main(["run", str(job), "--cancel"]) == 2
    assert main(["cancel", str(job)]) == 2
    assert capsys.readouterr().err.count("is for endpoint.mode: batch") == 2
    assert sim.simulator.requests == 0


def test_chunks_respect_both_limits(tmp_path: Path) -> None:
    writer = ChunkWriter(tmp_path, max_lines=4, max_bytes=300)
    chunks = []
    for number in range(40):
        line = encode_line(custom_id(number, 1), {"messages": [{"content": "x" * (number % 9)}]})
        row = LineRow(number, custom_id(number, 1), b"", None, 1, 1, 0.0)
        closed = writer.add(line, row)
        chunks += [closed] if closed else []
    last = writer.close()
    chunks += [last] if last else []
    assert [row.key for chunk in chunks for row in chunk.rows] == list(range(40))
    for chunk in chunks:
        content = chunk.path.read_bytes()
        assert len(content) == chunk.bytes <= 300
        assert len(content.splitlines()) == len(chunk.rows) <= 4
        ids = [json.loads(line)["custom_id"] for line in content.splitlines()]
        assert ids == [row.custom_id for row in chunk.rows]
    assert not list(tmp_path.glob("*.partial"))


def test_collector_sorts_each_line_by_what_came_back(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, "http://127.0.0.1:9/v1", retry={"max_attempts": 3}))
    tally = Tally()
    builder = OutcomeBuilder(job.config, PriceTable.load().for_batch(), tally)
    collector = Collector(job.config, builder, OutputParser(job.config), secret=None)

    def row(key: str, attempts: int = 1) -> BookRow:
        return BookRow(
            key, f"id-{key}", "c", "submitted", b"f", None, attempts, attempts, None, 0.0, None
        )

    def line(key: str, status: int, body: dict[str, Any]) -> bytes:
        response = {"status_code": status, "body": body}
        return json.dumps({"custom_id": f"id-{key}", "response": response, "error": None}).encode()

    reply = {
        "id": "r1",
        "model": MODEL,
        "choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100},
    }
    expired = {"custom_id": "id-e", "response": None, "error": {"code": "batch_expired"}}
    output = b"\n".join([line("ok", 200, reply), b'{"custom_id": "id-torn", "resp'])
    errors = b"\n".join(
        [
            line("five", 500, {"error": {"message": "overloaded"}}),
            line("last", 503, {"error": {"message": "down"}}),
            line("bad", 400, {"error": {"message": "max_tokens is too large"}}),
            line("poor", 402, {"error": {"message": "Your credit balance is too low"}}),
            json.dumps(expired).encode(),
            line("stranger", 200, reply),
        ]
    )
    rows = [row(k) for k in ("ok", "torn", "five", "bad", "poor", "e", "lost")]
    rows.append(row("last", attempts=3))
    collected = anyio.run(collector.collect, rows, read_results(output, errors), "completed", False)

    states = {u.key: (u.state, u.attempts, u.error) for u in collected.updates}
    assert states["ok"] == ("done", 1, None)
    assert states["five"] == ("retry", 1, "http_500: overloaded")
    assert states["e"][:2] == ("retry", 1)
    assert states["torn"][:2] == states["lost"][:2] == ("retry", 1)  # no usable line: again
    assert states["poor"][:2] == ("retry", 0)  # the account's fault: not counted
    assert states["bad"] == ("done", 1, None)
    assert states["last"] == ("done", 3, None)  # retry.max_attempts reached
    assert "stranger" not in states
    outcomes = {o.key: o for o in collected.outcomes}
    assert outcomes["ok"].cost_usd == pytest.approx((1000 * 0.4 + 100 * 2) / 1_000_000)
    assert outcomes["bad"].error == "http_400: max_tokens is too large"
    assert outcomes["last"].error == "http_503: down"
    assert isinstance(collected.stop, AccountError)
    assert tally.ok == 1
    assert tally.failed == 2

    cancelled = anyio.run(collector.collect, [row("c1", 2)], {}, "cancelled", True)
    assert [(u.state, u.attempts) for u in cancelled.updates] == [("retry", 1)]
    theirs = anyio.run(collector.collect, [row("c2", 2)], {}, "cancelled", False)
    assert [(u.state, u.attempts) for u in theirs.updates] == [("retry", 2)]


def test_a_line_without_usage_is_charged_what_it_held(tmp_path: Path) -> None:
    """A batch result without usage costs what its line held against the cap, not $0: the
    journal's spend counts it, and the summary says how many such replies came."""
    job = load_job(write_job(tmp_path, "http://127.0.0.1:9/v1"))
    tally = Tally()
    builder = OutcomeBuilder(job.config, PriceTable.load().for_batch(), tally)
    collector = Collector(job.config, builder, OutputParser(job.config), secret=None)
    row = BookRow("k", "id-k", "c", "submitted", b"f", None, 1, 1, None, 0.0, None, 0.25)
    reply = {"id": "r", "model": MODEL, "choices": [{"message": {"content": "ok"}}]}
    response = {"status_code": 200, "body": reply}
    line = json.dumps({"custom_id": "id-k", "response": response, "error": None}).encode()
    collected = anyio.run(collector.collect, [row], read_results(line), "completed", False)
    (outcome,) = collected.outcomes
    assert outcome.cost_usd == 0.25
    assert tally.cost_usd == 0.25
    assert tally.warnings[UNMETERED] == 1


def test_a_collect_cut_short_is_finished_by_the_rerun(
    tmp_path: Path, sim_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Collected a slice at a time: a crash between slices loses nothing, repeats nothing."""
    monkeypatch.setattr(results, "COLLECT_ROWS", 7)
    original = BatchBook.collect
    calls = {"count": 0}

    def crash_on_third_slice(self: BatchBook, *arguments: Any) -> None:
        calls["count"] += 1
        if calls["count"] == 3:
            raise RuntimeError("power cut")
        original(self, *arguments)

    monkeypatch.setattr(BatchBook, "collect", crash_on_third_slice)
    data = reviews(30)
    server = sim_factory()
    job = batch_job(tmp_path, server.url, data)
    with pytest.raises(ExceptionGroup) as crash:
        main(["run", str(job), "--quiet"])
    assert crash.group_contains(RuntimeError, match="power cut")
    monkeypatch.setattr(BatchBook, "collect", original)
    assert main(["run", str(job), "--quiet"]) == 0
    output = pl.read_parquet(tmp_path / "out/result.parquet")
    assert output.get_column("id").to_list() == data.get_column("id").to_list()
    assert output.get_column("error").null_count() == 30
    service = server.simulator.batches
    assert len(service.batches) == 1
    assert set(service.uploaded.values()) == {1}


def test_a_job_can_set_its_own_batch_prices(tmp_path: Path, sim_factory: Any) -> None:
    server = sim_factory()
    prices = {MODEL: {"input": 1.0, "output": 2.0, "batch_input": 0.1, "batch_output": 0.5}}
    job = write_job(
        tmp_path,
        server.url,
        data=reviews(10),
        endpoint={"mode": "batch"},
        batch={"poll_s": 0.1},
        prices=prices,
    )
    assert main(["run", str(job), "--quiet"]) == 0
    for row in pl.read_parquet(tmp_path / "out/result.parquet").iter_rows(named=True):
        expected = (row["prompt_tokens"] * 0.1 + row["completion_tokens"] * 0.5) / 1_000_000
        assert row["cost_usd"] == pytest.approx(expected)
