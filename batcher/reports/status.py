"""`batcher status`: how far a job is, from its journal and its input's row count alone."""

from __future__ import annotations

from dataclasses import dataclass, field

from batcher.config import Job
from batcher.rows.source import Source
from batcher.runs.batch.book import describe
from batcher.store.journal import journal_path, reading, totals


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

    @property
    def rows_pending(self) -> int:
        return max(self.rows_total - self.rows_ok - self.rows_failed, 0)

    def lines(self) -> list[str]:
        if self.journal is None:
            return [f"no checkpoint yet: {self.rows_total} rows pending"]
        lines = [
            f"checkpoint: {self.journal}",
            f"rows: {self.rows_total} to answer; {self.rows_ok} done, "
            f"{self.rows_failed} failed, {self.rows_pending} pending",
            f"tokens so far: {self.prompt_tokens} in, {self.completion_tokens} out; "
            f"cost ${self.cost_usd:.4f}",
        ]
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
    )
