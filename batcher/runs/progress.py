"""The progress of a live run: a tqdm bar on a terminal, status lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tqdm import tqdm

from batcher.errors import printable
from batcher.send.tally import Tally

if TYPE_CHECKING:
    from batcher.flow.controller import FlowController

_POSTFIX_EVERY_S = 0.5


class Progress:
    """A tqdm bar on a terminal; plain status lines every ``every_s`` seconds otherwise (nohup,
    cron, CI logs), so an overnight log tells how the night went; nothing with --quiet."""

    def __init__(
        self,
        tally: Tally,
        total: int,
        *,
        quiet: bool,
        flow: FlowController | None = None,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tally = tally
        self._clock = clock
        self.flow = flow
        self.total = total
        self.done = 0
        self._started = self._last_postfix = self._last_line = clock()
        self._last_requests = 0
        self._line_requests = 0
        self._rate = 0.0
        terminal = sys.stderr.isatty()
        self._every_s = every_s if not quiet and not terminal and every_s > 0 else None
        self._bar = tqdm(
            total=total,
            unit="row",
            file=sys.stderr,
            disable=quiet or not terminal,
            dynamic_ncols=True,
            mininterval=0.25,
        )

    def advance(self, rows: int = 1) -> None:
        self.done += rows
        self._bar.update(rows)
        now = self._clock()
        if now - self._last_postfix >= _POSTFIX_EVERY_S:
            self._refresh_postfix(now)

    def _refresh_postfix(self, now: float) -> None:
        t = self.tally
        # The request rate over the last refresh interval, not since the start.
        self._rate = (t.requests - self._last_requests) / max(now - self._last_postfix, 1e-9)
        self._last_postfix, self._last_requests = now, t.requests
        flow = f" {self.flow.status().describe()}" if self.flow is not None else ""
        self._bar.set_postfix_str(
            printable(
                f"ok={t.ok} failed={t.failed} retries={t.retries} 429s={t.rate_limited} "
                f"req/s={self._rate:.1f} tok={t.prompt_tokens}/{t.completion_tokens} "
                f"{t.spend.describe()}{flow}"
            ),
            refresh=False,
        )

    def tick(self) -> None:
        """Called once a second: prints a status line when one is due."""
        now = self._clock()
        if self._every_s is None or now - self._last_line < self._every_s:
            return
        print(printable(self.status_line(now)), file=sys.stderr, flush=True)

    def status_line(self, now: float) -> str:
        t = self.tally
        rate = (t.requests - self._line_requests) / max(now - self._last_line, 1e-9)
        self._last_line, self._line_requests = now, t.requests
        elapsed = int(now - self._started)
        share = self.done / self.total if self.total else 1.0
        limited = t.rate_limited / t.requests if t.requests else 0.0
        flow = f", {self.flow.status().describe()}" if self.flow is not None else ""
        return (
            f"[{elapsed // 3600:d}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}] "
            f"{self.done}/{self.total} rows ({share:.1%}), {t.ok} ok, {t.failed} failed, "
            f"{rate:.1f} req/s{flow}, 429s {limited:.1%}, {t.spend.describe()}"
        )

    def close(self) -> None:
        self._refresh_postfix(self._clock())
        self._bar.close()
