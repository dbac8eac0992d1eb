"""`batcher estimate`: rows, tokens, dollars and duration of a job before it is paid for.

Without a sample, prompt tokens come from the request heuristic (characters / 4, images by
width x height / 750 after resizing) and completion tokens are bounded by ``max_tokens``:
low assumes no completion at all, expected half of ``max_tokens``, high all of it plus
``PROMPT_MARGIN`` on prompt tokens (the heuristic undercounts some text). With a sample, K
random rows are really run (and checkpointed, so the job does not pay for them again) and
the total is extrapolated from their real cost with a 95 % interval. The duration is the
slowest bound the limits put on the run (``duration.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from batcher.config import Job
from batcher.reports.duration import Duration, Workload, predict_duration
from batcher.rows.plan import Plan, plan_job
from batcher.rows.request import PROMPT_MARGIN, RowRequest
from batcher.send.prices import PriceTable

ASSUMED_LATENCY_S = 2.0  # per request, when no sample has measured it
_DOLLARS = ("low_usd", "expected_usd", "high_usd")


@dataclass(frozen=True, slots=True)
class Estimate:
    rows: int
    prompt_tokens: int
    completion_tokens_high: int
    low_usd: float | None
    expected_usd: float | None
    high_usd: float | None
    duration: Duration
    sampled_rows: int = 0
    note: str | None = None
    # With a model list: the heuristic's figures for each model, split by request_model.
    by_model: list[dict[str, Any]] = field(default_factory=list)
    # The same at Batch API prices (endpoint.mode: batch).
    batch_low_usd: float | None = None
    batch_expected_usd: float | None = None
    batch_high_usd: float | None = None
    completion_window: str = "24h"

    def as_json(self) -> dict[str, Any]:
        split = {"by_request_model": self.by_model} if self.by_model else {}
        return {
            "rows": self.rows,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens_high": self.completion_tokens_high,
            "low_usd": self.low_usd,
            "expected_usd": self.expected_usd,
            "high_usd": self.high_usd,
            "batch_low_usd": self.batch_low_usd,
            "batch_expected_usd": self.batch_expected_usd,
            "batch_high_usd": self.batch_high_usd,
            "duration_s": self.duration.seconds,
            "duration_bound": self.duration.bound,
            "duration_at_least": not self.duration.rate_known,
            **split,
        }

    def lines(self) -> list[str]:
        def usd(value: float | None) -> str:
            return "unknown" if value is None else f"${value:,.4f}"

        lines = [
            f"rows: {self.rows}",
            f"prompt tokens (estimated): {self.prompt_tokens:,}",
            f"completion tokens (at most): {self.completion_tokens_high:,}",
            f"cost, live:  low {usd(self.low_usd)}, expected {usd(self.expected_usd)}, "
            f"high {usd(self.high_usd)}",
            f"cost, batch: low {usd(self.batch_low_usd)}, expected "
            f"{usd(self.batch_expected_usd)}, high {usd(self.batch_high_usd)} "
            f"(endpoint.mode: batch)",
            f"duration, live: {self.duration.describe()}",
            f"duration, batch: up to the {self.completion_window} completion window per batch",
        ]
        for group in self.by_model:
            lines.append(
                f"  {group['request_model']}: {group['rows']} rows, "
                f"{group['prompt_tokens']:,} prompt tokens; cost: low {usd(group['low_usd'])}, "
                f"expected {usd(group['expected_usd'])}, high {usd(group['high_usd'])}"
            )
        if self.sampled_rows:
            lines.append(f"from {self.sampled_rows} rows run for real (checkpointed)")
        if self.note:
            lines.append(f"note: {self.note}")
        return lines


def count_tokens(plan: Plan) -> tuple[int, int]:
    """Estimated prompt tokens of every row, and rows (blocking: reads the whole input)."""
    counts = count_tokens_by_model(plan).values()
    return sum(p for p, _ in counts), sum(r for _, r in counts)


def count_tokens_by_model(plan: Plan) -> dict[str, tuple[int, int]]:
    """Estimated prompt tokens and rows for each model asked (blocking: reads the input)."""
    counts = dict.fromkeys(plan.models, (0, 0))
    completion_per_row = plan.builder.completion_tokens
    models = len(plan.models)
    for batch in plan.batches():
        # prepare gives each row's models in list order.
        for index, (_, item, _) in enumerate(plan.prepare(batch)):
            model = plan.models[index % models]
            prompt, rows = counts[model]
            if isinstance(item, RowRequest):
                prompt += item.estimated_tokens - completion_per_row
            counts[model] = (prompt, rows + 1)
    return counts


def estimate(job: Job, *, limit: int | None = None, prices_path: str | None = None) -> Estimate:
    """The estimate from the heuristic alone; sends nothing."""
    plan = plan_job(job, limit=limit, api_key_required=False)
    job = plan.job
    prices = PriceTable.load(prices_path, job.config.prices)
    groups = []
    unpriced = []
    for model, (prompt, rows) in count_tokens_by_model(plan).items():
        completion_high = rows * plan.builder.completion_tokens
        group: dict[str, Any] = {
            "request_model": model,
            "rows": rows,
            "prompt_tokens": prompt,
            "completion_tokens_high": completion_high,
            "low_usd": None,
            "expected_usd": None,
            "high_usd": None,
        }
        price = prices.get(model)
        if price is None:
            unpriced.append(model)
        else:
            group["low_usd"] = price.cost(prompt, 0)
            group["expected_usd"] = price.cost(prompt, completion_high // 2)
            group["high_usd"] = price.cost(math.ceil(prompt * PROMPT_MARGIN), completion_high)
            batch = price.for_batch()
            group["batch_low_usd"] = batch.cost(prompt, 0)
            group["batch_expected_usd"] = batch.cost(prompt, completion_high // 2)
            group["batch_high_usd"] = batch.cost(math.ceil(prompt * PROMPT_MARGIN), completion_high)
        groups.append(group)
    prompt = sum(g["prompt_tokens"] for g in groups)
    rows = sum(g["rows"] for g in groups)
    completion_high = sum(g["completion_tokens_high"] for g in groups)
    note = None
    low = expected = high = None
    batch_usd: list[float | None] = [None, None, None]
    if unpriced:
        note = f"no price for model {', '.join(unpriced)}: dollars unknown"
    else:
        low, expected, high = (sum(g[f] for g in groups) for f in _DOLLARS)
        batch_usd = [sum(g["batch_" + f] for g in groups) for f in _DOLLARS]
    # Tokens as the limiter reserves them: the prompt estimate and all of max_tokens.
    per_row = (prompt / rows, completion_high / rows) if rows else (0.0, 0.0)
    work = Workload.of_rows(rows, per_row, plan.builder.requests_per_row, ASSUMED_LATENCY_S)
    duration = predict_duration(job.config.limits, work)
    by_model = groups if plan.multiple_models else []
    return Estimate(
        rows,
        prompt,
        completion_high,
        low,
        expected,
        high,
        duration,
        note=note,
        by_model=by_model,
        batch_low_usd=batch_usd[0],
        batch_expected_usd=batch_usd[1],
        batch_high_usd=batch_usd[2],
        completion_window=job.config.batch.completion_window,
    )
