"""`batcher status`: how far a job is, from its journal and its input's row count alone."""

from __future__ import annotations

from dataclasses import dataclass, field

from batcher.config import Job
from batcher.rows.source import Source
from batcher.runs.batch.book import describe
from batcher.store.journal import Superseded, journal_path, reading, totals
from batcher.store.spend import Spend


@dataclass(frozen=True, slots=True)
class JobStatus:
    rows_total: int
    rows_ok: int
    rows_failed: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    failed_by_kind: dict[str, int] = field(default_factory=dict)
    journal: str | None = None
    batches: list[str] = field(default_factory=list)  # batch mode: what is in flight
    unpriced_rows: int = 0  # rows whose cost is unknown (no price), left out of cost_usd
    # Outcomes replaced by newer ones for their rows (retried, asked again): paid for too.
    superseded: Superseded = field(default_factory=Superseded)

    @property
    def spent(self) -> Spend:
        """What the job has spent: its rows' outcomes and the ones they replaced."""
        return Spend(self.cost_usd, self.unpriced_rows) + self.superseded.spend

    @property
    def rows_pending(self) -> int:
        return max(self.rows_total - self.rows_ok - self.rows_failed, 0)

    def lines(self) -> list[str]:
        if self.journal is None:
            return [f"no checkpoint yet: {self.rows_total} rows pending"]
        gone = self.superseded
        lines = [
            f"checkpoint: {self.journal}",
            f"rows: {self.rows_total} to answer; {self.rows_ok} done, "
            f"{self.rows_failed} failed, {self.rows_pending} pending",
            f"tokens so far: {self.prompt_tokens + gone.prompt_tokens} in, "
            f"{self.completion_tokens + gone.completion_tokens} out; "
            f"spent on this job {self.spent.describe()}",
        ]
        if gone.times:
            lines.append(
                f"of which on earlier outcomes of rows asked again: {gone.spend.describe()} "
                f"({gone.times} outcomes of {gone.keys} rows, since replaced); "
                f"on the outcomes held now: {Spend(self.cost_usd, self.unpriced_rows).describe()}"
            )
        if self.failed_by_kind:
            kinds = ", ".join(
                f"{kind} {count}" for kind, count in sorted(self.failed_by_kind.items())
            )
            lines.append(f"failed by error: {kinds}")
        return lines + self.batches


def job_status(job: Job, limit: int | None = None) -> JobStatus:
    input_rows = Source(job.input_path, job.config.input.id_column).count_rows(limit)
    total = input_rows * len(job.config.request.models)  # one output row per model asked
    path = journal_path(job.checkpoint_dir)
    if not path.exists():
        return JobStatus(total, 0, 0, 0, 0, 0.0)
    with reading(path) as connection:
        held = totals(connection)
        batches = describe(connection)
    return JobStatus(
        total,
        held.ok,
        held.failed,
        held.prompt_tokens,
        held.completion_tokens,
        held.cost_usd,
        held.failed_by_kind,
        str(path),
        batches,
        held.unpriced_rows,
        held.superseded,
    )
