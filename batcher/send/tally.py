"""Running counts of one run: what the stages that send count, and the summary reads."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from batcher.store.columns import Outcome
from batcher.store.spend import Spend


@dataclass(slots=True)
class Tally:
    """What this run has done so far; the progress bar and the summary read it."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    inflight_cost_usd: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    unpriced_rows: int = 0  # rows done whose cost is unknown (no price for their model)

    @property
    def spend(self) -> Spend:
        return Spend(self.cost_usd, self.unpriced_rows)

    def recount(self, counted: Outcome, stored: Outcome) -> None:
        """A row counted as ``counted`` that the journal stored as ``stored`` (a value did not
        fit its column: the row failed)."""
        if counted.ok:
            self.ok -= 1
            self.failed += 1
        else:
            self.errors.subtract([f"final:{counted.error_kind}"])
            self.errors += Counter()  # drops the kind it left at 0
        self.errors[f"final:{stored.error_kind}"] += 1
