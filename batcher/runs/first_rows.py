"""A run's first rows as a test of the job: a mistake found only by sending (a schema no reply
meets, a prompt or a parameter the server refuses) ends the run after ``limits.early_stop_rows``
rows, not after every row paid for its retries.

The test, the same in every mode: when the first rows this run settles all fail with the same
kind of error that retries do not cure and that points at the job, dispatch stops
(``FirstRowsFailedError``, exit 3). One of them answered, or failed another way (a 5xx, a
timeout: the server's, never the job's), and the test is passed for the rest of the run. Rows
done before this run are not its rows; rows it sends again (they failed before) are. The live
engine hands out only the first rows until they pass (``admit``): one success is enough, so a
sound job waits one reply's latency for it; batch mode tests the first rows its batches bring
back, and stops further submission.
"""

from __future__ import annotations

import anyio

from batcher.errors import FirstRowsFailedError, shorten
from batcher.runs.stopping import Stopping
from batcher.send.client import RETRYABLE_STATUS
from batcher.store.columns import INTERRUPTED, Outcome

# The kinds of final error that say the job is wrong, and where to look. Any other 4xx that is
# not retried (400, 404, 413, 422...) says so too; 401/403 and 402 stop the run on their own.
_HINTS = {
    "invalid_output": "check output.schema (or the tool's parameters) against the prompt",
    "finish_reason": "check request.max_tokens and output.fail_on_finish",
}
_REFUSED = "check request.model and the request's parameters against the server's message"


def mistake_hint(kind: str) -> str | None:
    """Where to look when rows fail with ``kind``; None when ``kind`` is not the job's fault
    (429, 5xx, timeouts, connections, bad replies, images, the run's own stop)."""
    if kind in _HINTS:
        return _HINTS[kind]
    status = kind.removeprefix("http_")
    if kind.startswith("http_4") and status.isdigit() and int(status) not in RETRYABLE_STATUS:
        return _REFUSED
    return None


class FirstRows:
    """The test of one run's first ``rows`` rows (0: no test); stops ``stopping`` if failed."""

    def __init__(self, rows: int, stopping: Stopping) -> None:
        self.rows = rows
        self._stopping = stopping
        self._handed = 0
        self._settled = 0
        self._kind: str | None = None
        self._detail = ""
        self._verdict = anyio.Event()  # set once the test is passed or failed
        if rows == 0:
            self._verdict.set()

    async def admit(self) -> None:
        """Before a row is handed out to be sent: the first ``rows`` go at once, the next waits
        for the verdict (a stop cancels the wait with the producer's scope)."""
        if self._handed >= self.rows:
            await self._verdict.wait()
        self._handed += 1

    def settled(self, outcome: Outcome) -> None:
        """One row of this run settled: a success or another error passes the test; the
        ``rows``-th failure of the same kind fails it."""
        if self._verdict.is_set() or outcome.error_kind == INTERRUPTED:
            return
        kind = outcome.error_kind
        hint = None if outcome.ok or kind is None else mistake_hint(kind)
        if kind is None or hint is None or self._kind not in (None, kind):
            self._verdict.set()
            return
        if self._kind is None:
            self._kind = kind
            self._detail = (outcome.error or "").removeprefix(f"{kind}: ")
        self._settled += 1
        if self._settled < self.rows:
            return
        self._verdict.set()
        self._stopping.stop_dispatch(
            FirstRowsFailedError(
                f"the first {self.rows} rows sent all failed with {kind} "
                f"({shorten(self._detail, 120)}); {hint}. Nothing more was sent: fix the job "
                "and run it again, these rows are sent again (limits.early_stop_rows: 0 turns "
                "this test off)",
                kind=kind,
                rows=self.rows,
            )
        )
