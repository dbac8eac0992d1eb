"""The batch-mode progress bar: rows finished, batches by server status, rows by state."""

from __future__ import annotations

import sys
from collections import Counter

from tqdm import tqdm

from batcher.send.tally import Tally


class BatchProgress:
    """A tqdm bar on stderr; silent when stderr is not a terminal or with --quiet."""

    def __init__(self, tally: Tally, total: int, *, quiet: bool) -> None:
        self.tally = tally
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

    def show(self, batches: Counter[str], rows: dict[str, int]) -> None:
        """Batches by the server's status and rows by their state in the checkpoint."""
        by_status = " ".join(f"{status}={count}" for status, count in sorted(batches.items()))
        t = self.tally
        self._bar.set_postfix_str(
            f"batches: {by_status or 'none'} | rows: submitted={rows.get('submitted', 0)} "
            f"retry={rows.get('retry', 0)} ok={t.ok} failed={t.failed} {t.spend.describe()}",
            refresh=True,
        )

    def close(self) -> None:
        self._bar.close()
