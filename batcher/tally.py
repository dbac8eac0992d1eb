"""Running counts of one run, the tqdm progress bar that shows them, and the budget."""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

_POSTFIX_EVERY_S = 0.5


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


class Progress:
    """A tqdm bar on stderr; silent when stderr is not a terminal or with --quiet."""

    def __init__(self, tally: Tally, total: int, *, quiet: bool) -> None:
        self.tally = tally
        self._last_postfix = time.monotonic()
        self._last_requests = 0
        self._rate = 0.0
        self._bar = tqdm(
            total=total,
            unit="row",
            file=sys.stderr,
            disable=quiet or not sys.stderr.isatty(),
            dynamic_ncols=True,
            mininterval=0.25,
        )

    def advance(self, rows: int = 1) -> None:
        self._bar.update(rows)
        now = time.monotonic()
        if now - self._last_postfix >= _POSTFIX_EVERY_S:
            self._refresh_postfix(now)

    def _refresh_postfix(self, now: float) -> None:
        t = self.tally
        # The request rate over the last refresh interval, not since the start.
        self._rate = (t.requests - self._last_requests) / max(now - self._last_postfix, 1e-9)
        self._last_postfix, self._last_requests = now, t.requests
        self._bar.set_postfix_str(
            f"ok={t.ok} failed={t.failed} retries={t.retries} 429s={t.rate_limited} "
            f"req/s={self._rate:.1f} tok={t.prompt_tokens}/{t.completion_tokens} "
            f"${t.cost_usd:.4f}",
            refresh=False,
        )

    def close(self) -> None:
        self._refresh_postfix(time.monotonic())
        self._bar.close()
