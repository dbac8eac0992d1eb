"""Run summaries added up (``--ray`` adds its shards' runs) and carried across processes."""

from __future__ import annotations

import pickle
from pathlib import Path

from batcher.errors import BudgetReachedError, InputError, KeyRefusedError
from batcher.flow.controller import FlowReport
from batcher.runs.summary import RunSummary


def part(ok: int, failed: int, **fields: object) -> RunSummary:
    """One shard's run of 10 rows (the rest pending), 2 requests and 1 cent a row answered."""
    values: dict[str, object] = {
        "rows_total": 10,
        "rows_ok": ok,
        "rows_failed": failed,
        "rows_pending": 10 - ok - failed,
        "rows_skipped": 1,
        "requests": 2 * (ok + failed),
        "retries": 1,
        "rate_limited": 3,
        "prompt_tokens": 100,
        "completion_tokens": 50,
        "cost_usd": 0.01 * ok,
        "output_cost_usd": 0.02 * ok,
        "wall_s": 5.0,
    }
    return RunSummary(Path(f"part-{ok}.parquet"), **{**values, **fields})  # type: ignore[arg-type]


def test_counts_add_up_and_the_first_error_is_kept() -> None:
    budget = BudgetReachedError("the budget limits.max_cost_usd=0.05 would be crossed")
    refused = KeyRefusedError("key refused", status=401)
    flow = FlowReport(cuts=2)
    first = part(9, 1, errors={"final:http_400": 1, "http_503": 2}, warnings={"w": 1})
    second = part(
        4,
        0,
        wall_s=7.5,
        errors={"http_503": 1},
        warnings={"w": 1, "v": 1},
        error=budget,
        aborted=str(budget),
        resume_command="batcher run job.yaml --ray",
        flow=flow,
    )
    third = part(2, 2, error=refused, aborted=str(refused), resume_command="other")

    total = sum([first, second, third], RunSummary(Path("out.parquet")))
    assert total.output_path == Path("out.parquet")
    assert (total.rows_total, total.rows_ok, total.rows_failed, total.rows_pending) == (
        30,
        15,
        3,
        12,
    )
    assert (total.rows_skipped, total.requests, total.retries, total.rate_limited) == (
        3,
        36,
        3,
        9,
    )
    assert (total.prompt_tokens, total.completion_tokens) == (300, 150)
    assert abs(total.cost_usd - 0.15) < 1e-12
    assert abs(total.output_cost_usd - 0.30) < 1e-12
    assert total.wall_s == 7.5  # side by side: the longest, not the sum
    assert total.errors == {"final:http_400": 1, "http_503": 3}
    assert total.warnings == {"w": 2, "v": 1}
    # The first error in the order added, with its message and resume command.
    assert total.error is budget
    assert total.aborted == str(budget)
    assert total.resume_command == "batcher run job.yaml --ray"
    assert total.exit_code == 3
    assert total.flow is flow
    # Runs that all ran to the end: no error, exit 1 for the failed rows.
    clean = first + part(3, 0)
    assert (clean.error, clean.aborted, clean.resume_command, clean.exit_code) == (
        None,
        None,
        None,
        1,
    )


def test_a_summary_with_its_error_crosses_processes_whole() -> None:
    """A shard's summary reaches the driver pickled: an error with keyword-only context
    (the status of a refused key, the row of a bad input) must come back as itself."""
    for error in (KeyRefusedError("key refused", status=403), InputError("bad", row=7)):
        summary = part(1, 0, error=error, aborted=str(error))
        back = pickle.loads(pickle.dumps(summary))
        assert back == summary.__class__(**{**_fields(summary), "error": back.error})
        assert type(back.error) is type(error)
        assert str(back.error) == str(error)
        assert vars(back.error) == vars(error)
        assert back.exit_code == 3


def _fields(summary: RunSummary) -> dict[str, object]:
    return {name: getattr(summary, name) for name in RunSummary.__dataclass_fields__}


def test_unpriced_rows_and_the_job_s_spend_add_up() -> None:
    first = part(3, 0, unpriced_rows=1, output_unpriced_rows=2, job_cost_usd=0.5)
    second = part(3, 0, unpriced_rows=2, job_unpriced_rows=4, job_cost_usd=0.25)
    total = first + second
    assert (total.unpriced_rows, total.output_unpriced_rows, total.job_unpriced_rows) == (3, 2, 4)
    assert total.job_cost_usd == 0.75
    # Known for one run only: what is known; for neither: not known.
    assert (first + part(1, 0)).job_cost_usd == 0.5
    assert (part(1, 0) + part(1, 0)).job_cost_usd is None
