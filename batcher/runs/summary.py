"""What a run did, as returned to Python callers and printed at the end of `batcher run`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from batcher.errors import BatcherError, BudgetReachedError, exit_code, printable
from batcher.flow.controller import FlowReport
from batcher.send.tally import Tally
from batcher.store.output import Written
from batcher.store.spend import Spend

_BOUND_SHARE = 0.2  # a bound holding the run this share of its time is worth a hint


@dataclass(frozen=True, slots=True)
class RunSummary:
    """The end of a run; ``exit_code`` is what `batcher run` exits with."""

    output_path: Path
    # Counts default to none, so ``RunSummary(path)`` is the start of a sum of runs.
    rows_total: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    rows_pending: int = 0
    rows_skipped: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    output_cost_usd: float = 0.0
    wall_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    aborted: str | None = None  # the message of ``error``
    resume_command: str | None = None
    flow: FlowReport | None = None
    # Why the run stopped before every row was tried (None: it ran to the end).
    error: BatcherError | None = None
    # Rows whose cost is unknown (no price for their model), left out of the sums above.
    unpriced_rows: int = 0
    output_unpriced_rows: int = 0
    # Spent on the job over all its runs, rows asked again included (the journal's figure;
    # None where it is not known, a --ray run with its checkpoint in object storage).
    job_cost_usd: float | None = None
    job_unpriced_rows: int = 0

    @classmethod
    def of_run(
        cls,
        tally: Tally,
        *,
        output_path: Path,
        rows_total: int,
        rows_ok: int,
        rows_failed: int,
        output_cost_usd: float,
        started: float,
        aborted: BatcherError | None,
        resume_command: str,
        flow: FlowReport | None = None,
        written: Written | None = None,
    ) -> RunSummary:
        """A run's summary from its tally; the resume command only when it stopped early;
        ``written`` (the output's own account) adds what is unpriced and the job's spend."""
        return cls(
            output_path=output_path,
            rows_total=rows_total,
            rows_ok=rows_ok,
            rows_failed=rows_failed,
            rows_pending=rows_total - rows_ok - rows_failed,
            rows_skipped=tally.skipped,
            requests=tally.requests,
            retries=tally.retries,
            rate_limited=tally.rate_limited,
            prompt_tokens=tally.prompt_tokens,
            completion_tokens=tally.completion_tokens,
            cost_usd=tally.cost_usd,
            output_cost_usd=output_cost_usd,
            wall_s=time.monotonic() - started,
            errors=dict(tally.errors),
            warnings=dict(tally.warnings),
            aborted=str(aborted) if aborted is not None else None,
            # Stopped by the cap, a rerun sends nothing until the cap is raised: no command.
            resume_command=resume_command
            if aborted is not None and not isinstance(aborted, BudgetReachedError)
            else None,
            flow=flow,
            error=aborted,
            unpriced_rows=tally.unpriced_rows,
            output_unpriced_rows=written.unpriced_rows if written is not None else 0,
            job_cost_usd=written.spent.cost_usd if written is not None else None,
            job_unpriced_rows=written.spent.unpriced_rows if written is not None else 0,
        )

    def __add__(self, other: RunSummary) -> RunSummary:
        """Two runs of parts of one job as one (``--ray`` adds its shards' runs): counts and
        error counts summed, the first run's error, resume command, flow and output kept.
        Runs side by side overlap, so the wall time is the longer one's; whoever ran them
        all (the driver) puts in its own."""
        if not isinstance(other, RunSummary):
            return NotImplemented
        first = self if self.error is not None or other.error is None else other
        return RunSummary(
            output_path=self.output_path,
            rows_total=self.rows_total + other.rows_total,
            rows_ok=self.rows_ok + other.rows_ok,
            rows_failed=self.rows_failed + other.rows_failed,
            rows_pending=self.rows_pending + other.rows_pending,
            rows_skipped=self.rows_skipped + other.rows_skipped,
            requests=self.requests + other.requests,
            retries=self.retries + other.retries,
            rate_limited=self.rate_limited + other.rate_limited,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cost_usd=self.cost_usd + other.cost_usd,
            output_cost_usd=self.output_cost_usd + other.output_cost_usd,
            wall_s=max(self.wall_s, other.wall_s),
            errors=_summed(self.errors, other.errors),
            warnings=_summed(self.warnings, other.warnings),
            aborted=first.aborted,
            resume_command=first.resume_command,
            flow=self.flow if self.flow is not None else other.flow,
            error=first.error,
            unpriced_rows=self.unpriced_rows + other.unpriced_rows,
            output_unpriced_rows=self.output_unpriced_rows + other.output_unpriced_rows,
            job_cost_usd=_known_sum(self.job_cost_usd, other.job_cost_usd),
            job_unpriced_rows=self.job_unpriced_rows + other.job_unpriced_rows,
        )

    @property
    def spend(self) -> Spend:
        """What this run spent."""
        return Spend(self.cost_usd, self.unpriced_rows)

    @property
    def output_spend(self) -> Spend:
        """What the output's rows cost."""
        return Spend(self.output_cost_usd, self.output_unpriced_rows)

    @property
    def job_spend(self) -> Spend | None:
        """What the job has spent over all its runs (None: not known)."""
        if self.job_cost_usd is None:
            return None
        return Spend(self.job_cost_usd, self.job_unpriced_rows)

    @property
    def exit_code(self) -> int:
        return exit_code(self.error, self.rows_failed)

    def lines(self) -> list[str]:
        rate = (
            (self.rows_ok + self.rows_failed - self.rows_skipped) / self.wall_s
            if self.wall_s
            else 0
        )
        spent = self.job_spend
        job = f", spent on this job {spent.describe()}" if spent is not None else ""
        lines = [
            f"rows: {self.rows_ok} ok, {self.rows_failed} failed, {self.rows_pending} pending "
            f"of {self.rows_total} ({self.rows_skipped} already done before this run)",
            f"requests: {self.requests} sent, {self.retries} retries, "
            f"{self.rate_limited} rate-limited (429)",
            f"tokens: {self.prompt_tokens} in, {self.completion_tokens} out; "
            f"cost this run {self.spend.describe()}, whole output "
            f"{self.output_spend.describe()}{job}",
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
        if self.flow is not None:
            lines += self._flow_lines(self.flow)
        lines += [f"warning: {w}" + (f" ({n}×)" if n > 1 else "") for w, n in self.warnings.items()]
        if self.aborted:
            lines.append(f"stopped: {self.aborted}")
        if self.resume_command:
            lines.append(f"resume with: {self.resume_command}")
        # Error kinds, warnings and the stop quote servers (a model name, a message): made
        # safe for the terminal they are printed on.
        return [printable(line) for line in lines]

    def _flow_lines(self, flow: FlowReport) -> list[str]:
        seen = []
        if flow.job:
            seen.append("job " + _per_minute(flow.job))
        if flow.headers:
            seen.append(f"server headers ({flow.header_style}) " + _per_minute(flow.headers))
        if flow.discovered_rpm is not None or flow.cuts:
            now = (
                f"{flow.discovered_rpm:,.0f} requests/min at the end"
                if flow.discovered_rpm is not None
                else "released at the end"
            )
            lowest = flow.lowest_discovered_rpm or 0
            seen.append(f"discovered {now} (lowest {lowest:,.0f}, {flow.cuts} cut(s))")
        lines = ["limits: " + ("; ".join(seen) if seen else "none known, requests went unpaced")]
        share = self.rate_limited / self.requests if self.requests else 0.0
        rate_limited = f"429s: {self.rate_limited} of {self.requests} requests ({share:.1%})"
        if flow.noise_share > 0:
            rate_limited += (
                f"; about {flow.noise_share:.1%} of answers were 429s the pace did not cause"
            )
        lines.append(rate_limited)
        total = sum(flow.bound_seconds.values())
        wall = max(self.wall_s, total, 1e-9)
        if flow.bound_seconds:
            shares = ", ".join(
                f"{name} {seconds / wall:.0%}"
                for name, seconds in sorted(flow.bound_seconds.items(), key=lambda i: -i[1])
            )
            lines.append(f"held back by: {shares} of the time")
        if flow.bound_seconds.get("concurrency", 0.0) / wall >= _BOUND_SHARE:
            if flow.concurrency_auto:
                hint = f"raise limits.max_concurrency (now {flow.concurrency_cap})"
            else:
                hint = f"raise limits.concurrency (now {flow.concurrency_cap}) or set it to auto"
            lines.append(f"hint: concurrency, not the rate, bound this run: {hint}")
        return lines


def _known_sum(a: float | None, b: float | None) -> float | None:
    """Two runs' figures where either is known (None: neither is)."""
    if a is None and b is None:
        return None
    return (a or 0.0) + (b or 0.0)


def _summed(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Two runs' counts by name, in the order first seen (the summary prints warnings so)."""
    summed = dict(a)
    for name, count in b.items():
        summed[name] = summed.get(name, 0) + count
    return summed


def _per_minute(rates: dict[str, float]) -> str:
    return ", ".join(
        f"{rate:,.0f} {budget.replace('_', ' ')}/min" for budget, rate in rates.items()
    )
