"""Spend over reruns: a row asked again (retried after failing, redone with --keep-done, its
prompt edited) keeps what its earlier outcome cost, so `status`, `cost` and the summary say
what the job really spent; a model without a price costs "unknown", never $0.0000."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import batcher
from batcher.cli import main
from batcher.runs.summary import RunSummary
from tests.conftest import MODEL, SimFactory, reviews, start, wait_for, write_job
from tests.test_finish import SHORT_MAX_TOKENS, mixed_reviews
from tests.test_models import SONNET

HAIKU = (0.80, 4.0)  # input, output: USD per million tokens, from the shipped table


def spent_in_status(job: Path, capsys: pytest.CaptureFixture[str]) -> float:
    capsys.readouterr()
    assert main(["status", str(job)]) == 0
    out = capsys.readouterr().out
    found = re.search(r"spent on this job \$(\d+\.\d{4})\n", out)
    assert found is not None, out
    return float(found.group(1))


def cost_report(output: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["cost", str(output), "--json"]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


def run(job: Path, **options: Any) -> RunSummary:
    return batcher.run(job, quiet=True, **options)


def assert_all_spend_counted(
    job: Path, runs: list[RunSummary], capsys: pytest.CaptureFixture[str]
) -> None:
    """status, cost and the last summary give what every run billed, together."""
    billed = sum(summary.cost_usd for summary in runs)
    assert runs[-1].job_cost_usd == pytest.approx(billed)
    assert spent_in_status(job, capsys) == pytest.approx(billed, abs=5e-5)
    output = runs[-1].output_path
    report = cost_report(output, capsys)
    assert report["job"]["cost_usd"] == pytest.approx(billed)
    assert report["job"]["unpriced_rows"] == 0
    # What the replaced outcomes cost is what the output no longer shows.
    current = float(pl.read_parquet(output)["cost_usd"].sum())
    assert report["total"]["cost_usd"] == pytest.approx(current)
    assert report["job"]["superseded_cost_usd"] == pytest.approx(billed - current)


def test_failed_rows_retried_on_every_rerun_keep_what_they_cost(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # Truncated replies are paid for and fail the row; each rerun retries them, and the
    # simulator's 500s on a share of first attempts are retried within each run, unpaid.
    server = sim_factory(fail_share=0.3, faults=("500",), fail_attempts_max=1)
    job = write_job(
        tmp_path,
        server.url,
        data=mixed_reviews(20),
        request={"max_tokens": SHORT_MAX_TOKENS},
        output={"fail_on_finish": ["length"]},
    )
    runs = [run(job) for _ in range(3)]
    assert [summary.rows_failed for summary in runs] == [10, 10, 10]
    assert runs[0].retries > 0  # the faults did happen
    assert_all_spend_counted(job, runs, capsys)
    # The simulator's own account: every answer it gave, at the model's price (the same
    # request gets the same reply, so each prompt's usage times its answers).
    simulator = server.simulator
    billed = sum(
        simulator.answered_by_prompt[prompt]
        * (usage["prompt_tokens"] * HAIKU[0] + usage["completion_tokens"] * HAIKU[1])
        / 1e6
        for prompt, usage in simulator.usage_by_prompt.items()
    )
    assert sum(simulator.answered_by_prompt.values()) == 20 + 10 + 10
    assert runs[-1].job_cost_usd == pytest.approx(billed)
    report = cost_report(runs[-1].output_path, capsys)
    assert (report["job"]["superseded_outcomes"], report["job"]["superseded_rows"]) == (20, 10)


def test_keep_done_after_raising_max_tokens_counts_the_truncated_answers(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    job = write_job(
        tmp_path,
        server.url,
        data=mixed_reviews(20),
        request={"max_tokens": SHORT_MAX_TOKENS},
        output={"fail_on_finish": ["length"]},
    )
    first = run(job)
    assert first.rows_failed == 10
    raised = write_job(
        tmp_path,
        server.url,
        data=mixed_reviews(20),
        request={"max_tokens": 64},
        output={"fail_on_finish": ["length"]},
    )
    second = run(raised, keep_done=True)
    assert (second.rows_ok, second.rows_skipped, second.requests) == (20, 10, 10)
    assert second.output_cost_usd < first.cost_usd + second.cost_usd  # the gap that vanished
    assert_all_spend_counted(raised, [first, second], capsys)


def test_edited_prompt_keeps_the_cost_of_the_answers_it_replaced(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    data = reviews(30)
    job = write_job(tmp_path, server.url, data=data)
    first = run(job)
    changed = 'Review {{ id }}: {{ text }}{% if stars == "5" %} (five stars){% endif %}'
    job = write_job(tmp_path, server.url, data=data, request={"prompt": changed})
    second = run(job)
    five = data.filter(pl.col("stars") == 5).height
    assert second.requests == five
    assert_all_spend_counted(job, [first, second], capsys)
    # The summary says it too.
    lines = "\n".join(second.lines())
    assert f"spent on this job ${first.cost_usd + second.cost_usd:.4f}" in lines


def price_file(folder: Path) -> Path:
    """A price table with the haiku model alone."""
    table = folder / "prices.yaml"
    table.write_text(f"models:\n  {MODEL}: {{input: 0.8, output: 4.0}}\n")
    return table


def test_unpriced_model_shows_unknown_never_zero(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url, request={"model": SONNET})
    assert main(["run", str(job), "--prices", str(price_file(tmp_path))]) == 0
    err = capsys.readouterr().err
    assert "cost this run unknown (20 rows of unpriced models)" in err
    assert "spent on this job unknown (20 rows of unpriced models)" in err
    assert "$0.0000" not in err
    assert main(["status", str(job)]) == 0
    out = capsys.readouterr().out
    assert "spent on this job unknown (20 rows of unpriced models)" in out
    assert "$0.0000" not in out
    output = tmp_path / "out/result.parquet"
    report = cost_report(output, capsys)
    assert report["total"]["unpriced_rows"] == 20
    assert report["groups"][0]["unpriced_rows"] == 20
    assert (report["job"]["cost_usd"], report["job"]["unpriced_rows"]) == (0.0, 20)
    assert main(["cost", str(output)]) == 0
    table = capsys.readouterr().out
    assert "unknown" in table
    assert "0.0000" not in table


def test_partly_priced_job_shows_dollars_plus_unknown(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url, request={"model": [MODEL, SONNET]})
    summary = run(job, prices_path=str(price_file(tmp_path)))
    out = pl.read_parquet(summary.output_path)
    priced = out.filter(pl.col("request_model") == MODEL)["cost_usd"].sum()
    assert summary.cost_usd == pytest.approx(priced)
    assert (summary.unpriced_rows, summary.job_unpriced_rows) == (20, 20)
    shown = f"${priced:.4f} + unknown for 20 rows of unpriced models"
    assert f"cost this run {shown}, whole output {shown}, spent on this job {shown}" in (
        "\n".join(summary.lines())
    )
    capsys.readouterr()
    assert main(["status", str(job)]) == 0
    assert f"spent on this job {shown}" in capsys.readouterr().out
    report = cost_report(summary.output_path, capsys)
    groups = {group["key"]: group for group in report["groups"]}
    assert (groups[MODEL]["unpriced_rows"], groups[SONNET]["unpriced_rows"]) == (0, 20)
    assert report["total"]["cost_usd"] == pytest.approx(priced)


def test_cost_without_the_checkpoint_says_what_it_shows(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url, output={"checkpoint_dir": "elsewhere"})
    assert main(["run", str(job), "--quiet"]) == 0
    output = tmp_path / "out/result.parquet"
    assert cost_report(output, capsys)["job"] is None
    assert main(["cost", str(output)]) == 0
    assert "spent on this job: not known without its checkpoint" in capsys.readouterr().out


def test_batch_mode_keeps_the_spend_of_rows_it_asks_again(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # Batch mode writes outcomes through its own book: the same journal keeps what they cost.
    server = sim_factory()

    def batch_job(max_tokens: int) -> Path:
        return write_job(
            tmp_path,
            server.url,
            data=mixed_reviews(20),
            endpoint={"mode": "batch"},
            batch={"poll_s": 0.05},
            request={"max_tokens": max_tokens},
            output={"fail_on_finish": ["length"]},
        )

    first = run(batch_job(SHORT_MAX_TOKENS))
    assert first.rows_failed == 10
    second = run(batch_job(64), keep_done=True)
    assert (second.rows_ok, second.rows_skipped) == (20, 10)
    assert_all_spend_counted(batch_job(64), [first, second], capsys)


def test_rows_interrupted_after_paying_keep_their_cost_when_sent_again(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # Three fan-out requests per row: a signal mid-run leaves rows that paid for some of
    # theirs, written `interrupted` with that cost; the next run sends them again whole.
    server = sim_factory(latency_s=0.1, latency_jitter_s=0.2, seed=5)
    job = write_job(
        tmp_path,
        server.url,
        data=reviews(120),  # 360 requests: about 6 s at this concurrency, stopped after 1
        request={"n": 3, "n_mode": "fanout"},
        limits={"concurrency": 12},
    )
    process = start(job)
    wait_for(lambda: server.simulator.answered >= 60 or process.poll() is not None)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 3, err.decode()  # stopped mid-run, not finished
    wait_for(lambda: server.simulator.in_flight == 0)
    assert main(["run", str(job), "--quiet", "--set", "limits.concurrency=64"]) == 0
    # The simulator's account: each distinct request gets one reply, paid each time it came.
    simulator = server.simulator
    billed = sum(
        simulator.answered_by_prompt[prompt]
        * (usage["prompt_tokens"] * HAIKU[0] + usage["completion_tokens"] * HAIKU[1])
        / 1e6
        for prompt, usage in simulator.usage_by_prompt.items()
    )
    report = cost_report(tmp_path / "out/result.parquet", capsys)
    assert report["job"]["superseded_rows"] > 0  # some rows were stopped mid-way
    assert report["job"]["cost_usd"] == pytest.approx(billed)
    assert report["total"]["cost_usd"] < billed  # what the output alone would have said
    assert spent_in_status(job, capsys) == pytest.approx(billed, abs=5e-5)
