"""What a run did, as returned to Python callers and printed at the end of `batcher run`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class RunSummary:
    """The end of a run; ``exit_code`` is what `batcher run` exits with."""

    output_path: Path
    rows_total: int
    rows_ok: int
    rows_failed: int
    rows_pending: int
    rows_skipped: int
    requests: int
    retries: int
    rate_limited: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    output_cost_usd: float
    wall_s: float
    errors: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    aborted: str | None = None
    resume_command: str | None = None

    @property
    def exit_code(self) -> int:
        if self.aborted is not None:
            return 3
        return 1 if self.rows_failed else 0

    def lines(self) -> list[str]:
        rate = (
            (self.rows_ok + self.rows_failed - self.rows_skipped) / self.wall_s
            if self.wall_s
            else 0
        )
        lines = [
            f"rows: {self.rows_ok} ok, {self.rows_failed} failed, {self.rows_pending} pending "
            f"of {self.rows_total} ({self.rows_skipped} already done before this run)",
            f"requests: {self.requests} sent, {self.retries} retries, "
            f"{self.rate_limited} rate-limited (429)",
            f"tokens: {self.prompt_tokens} in, {self.completion_tokens} out; "
            f"cost this run ${self.cost_usd:.4f}, whole output ${self.output_cost_usd:.4f}",
            f"time: {self.wall_s:.1f} s ({rate:.1f} rows/s)",
            f"output: {self.output_path}",
        ]
        final = {
            k.removeprefix("final:"): v for k, v in self.errors.items() if k.startswith("final:")
        }
        if final:
            lines.append(
                "failed rows by error: " + ", ".join(f"{k} {v}" for k, v in sorted(final.items()))
            )
        attempts = {k: v for k, v in self.errors.items() if not k.startswith("final:")}
        if attempts:
            lines.append(
                "failed attempts by error: "
                + ", ".join(f"{k} {v}" for k, v in sorted(attempts.items()))
            )
        lines += [f"warning: {w}" + (f" ({n}×)" if n > 1 else "") for w, n in self.warnings.items()]
        if self.aborted:
            lines.append(f"stopped: {self.aborted}")
        if self.resume_command:
            lines.append(f"resume with: {self.resume_command}")
        return lines
