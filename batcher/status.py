"""`batcher status`: how far a job is, from its journal and its input's row count alone."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

from batcher.batch.book import describe
from batcher.config import Job
from batcher.errors import ConfigError
from batcher.journal import connect, corrupt, journal_path, verify
from batcher.source import Source


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
    try:
        connection = connect(path, readonly=True)
    except sqlite3.Error as exc:
        raise ConfigError(f"{path}: cannot open the checkpoint: {exc}") from None
    try:
        verify(connection, path)
        rows = connection.execute(
            "SELECT ok, error_kind, count(*), total(prompt_tokens), total(completion_tokens), "
            "total(cost_usd) FROM outcomes GROUP BY ok, error_kind"
        ).fetchall()
        batches = describe(connection)
    except sqlite3.OperationalError as exc:
        raise ConfigError(f"{path}: cannot read the checkpoint: {exc}") from None
    except sqlite3.DatabaseError as exc:
        raise corrupt(path, str(exc)) from None
    finally:
        connection.close()
    ok = failed = prompt = completion = 0
    cost = 0.0
    kinds: dict[str, int] = {}
    for success, kind, count, prompt_tokens, completion_tokens, row_cost in rows:
        prompt += int(prompt_tokens)
        completion += int(completion_tokens)
        cost += float(row_cost)
        if success:
            ok += count
        else:
            failed += count
            kinds[kind or "unknown"] = count
    return JobStatus(total, ok, failed, prompt, completion, cost, kinds, str(path), batches)
