"""Filling chunks: the input scanned in order, each row that needs an answer (and is not in a
batch in flight) written as a line, until the input or the budget ends."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from batcher.errors import BudgetReachedError
from batcher.rows.images import ImageError, inline_images
from batcher.rows.plan import RowFailure, Unchanged
from batcher.rows.request import RowRequest
from batcher.runs.batch.book import BatchBook, BookRow
from batcher.runs.batch.lines import Chunk, ChunkWriter, LineRow, custom_id, encode_line
from batcher.runs.batch.progress import BatchProgress
from batcher.send.bound import request_bound
from batcher.send.budget import budget_reached, upper_cost
from batcher.send.prices import Price, PriceTable
from batcher.store.columns import Outcome

if TYPE_CHECKING:
    from batcher.runs.context import RunContext


class Filler:
    """Writes a run's pending rows as lines into chunks, holding each line's upper-bound cost
    against limits.max_cost_usd."""

    def __init__(
        self,
        context: RunContext,
        book: BatchBook,
        progress: BatchProgress,
        prices: PriceTable,
    ) -> None:
        self.plan = context.plan
        self.options = context.options
        self.config = context.plan.job.config
        self.tally = context.tally
        self.journal = context.journal
        self.book = book
        self.progress = progress
        self.stopping = context.stopping
        # Set in the worker thread that fills; the submitter hands it to ``stopping`` on the
        # event loop (a cancel scope is not cancelled from another thread).
        self.budget_reached: BudgetReachedError | None = None
        # A line did not fit beside the batches in flight: filling waits for them to end.
        self.waiting = False
        self._prices = prices
        # What the job spent before this run: the cap is the job's.
        self._spent_before_usd = context.spent_before_usd
        self._started_wall = time.time()
        # Input positions: rows before ``_seen`` were counted (skipped, failed) by this run.
        self._position = 0
        self._seen = 0
        self._committed_usd = 0.0
        self._failed_here: set[Any] = set()  # keys whose line could not be written, this run

    def rescan(self, committed_usd: float) -> None:
        """Start again from the input's first row, batches in flight holding ``committed_usd``."""
        self._committed_usd = committed_usd
        self._position = 0
        self.waiting = False

    def fill(self, batches: Iterator[Any], writer: ChunkWriter) -> tuple[list[Chunk], bool]:
        """Write the lines of one input batch; the chunks they closed, and whether there is
        more input (blocking: runs in a worker thread)."""
        batch = next(batches, None)
        if batch is None or self.stopping.stopping or self.budget_reached is not None:
            return [], False
        if self.waiting:
            return [], False
        decided = self.plan.decide(batch, self.journal.done, skip_failed=self.options.skip_failed)
        booked = self.book.rows([key for key, _ in decided])
        closed: list[Chunk] = []
        failures: list[Outcome] = []
        for key, item in decided:
            fresh = self._position >= self._seen  # first time this run looks at the row
            self._position += 1
            self._seen = max(self._seen, self._position)
            if isinstance(item, Unchanged):
                if fresh:
                    self.tally.skipped += 1
                    self.progress.advance()
                continue
            if isinstance(item, RowFailure):
                if fresh:
                    failures.append(self._failed_before(item.outcome()))
                continue
            if key in self._failed_here:
                continue  # its line could not be written (image, size): failed this run
            row = booked.get(key)
            if row is not None and row.state == "submitted":
                continue  # in a batch in flight: its result will come
            if row is not None and row.state == "done" and self._settled_now(row):
                continue  # finally failed in this run: a rerun tries it again
            made = self._line(key, item, row, writer)
            if isinstance(made, Outcome):
                self._failed_here.add(key)
                failures.append(self._failed_before(made))
                continue
            line, line_row = made
            if self._over_budget(item, line_row.upper_cost_usd):
                break
            self._committed_usd += line_row.upper_cost_usd
            done = writer.add(line, line_row)
            if done is not None:
                closed.append(done)
        if failures:
            self.book.record_failures(failures)
        more = not (self.stopping.stopping or self.budget_reached is not None or self.waiting)
        return closed, more

    def _line(
        self, key: Any, item: RowRequest, row: BookRow | None, writer: ChunkWriter
    ) -> tuple[bytes, LineRow] | Outcome:
        """A row's JSONL line, or the failure that keeps it from being sent."""
        attempt = row.attempts + 1 if row is not None and row.state == "retry" else 1
        submission = row.submissions + 1 if row is not None else 1
        try:
            body = inline_images(item, self.plan.images) if item.images else item.body
        except ImageError as exc:
            return _line_failure(item, "image_error", str(exc))
        identifier = custom_id(key, submission)
        line = encode_line(identifier, body)
        if not writer.fits_alone(line):
            limit = writer.max_bytes
            message = f"the request is {len(line):,} bytes, over batch.max_bytes={limit:,}"
            return _line_failure(item, "too_large", message)
        upper = self._upper_cost(item)
        fingerprint, digest = item.fingerprint, item.input_digest
        return line, LineRow(key, identifier, fingerprint, digest, attempt, submission, upper)

    def _over_budget(self, request: RowRequest, upper_usd: float) -> bool:
        """Would this line cross limits.max_cost_usd, with every batch at its upper bound?"""
        cap = self.config.limits.max_cost_usd
        spent = self._spent_before_usd + self.tally.cost_usd
        if cap is None or spent + self._committed_usd + upper_usd <= cap:
            return False
        if self._committed_usd > 0:
            # What lines in flight hold comes back, but for what they cost, when they end.
            self.waiting = True
            return True
        price = self._price(request)
        limited = price is None or request_bound(request, price).output_limited
        self.budget_reached = budget_reached(
            cap, spent, request_usd=upper_usd, output_limited=limited
        )
        return True

    def _settled_now(self, row: BookRow) -> bool:
        return row.settled_at is not None and row.settled_at >= self._started_wall

    def _failed_before(self, outcome: Outcome) -> Outcome:
        self.tally.failed += 1
        self.tally.errors[f"final:{outcome.error_kind}"] += 1
        self.progress.advance()
        return outcome

    def _price(self, request: RowRequest) -> Price | None:
        return self._prices.get(str(request.body.get("model")))

    def _upper_cost(self, request: RowRequest) -> float:
        """An upper bound of a line's cost: its worst case (``send/bound.py``), at batch
        prices."""
        price = self._price(request)
        return 0.0 if price is None else upper_cost(price, request)


def _line_failure(request: RowRequest, kind: str, message: str) -> Outcome:
    return Outcome.failed(
        request.key, request.fingerprint, kind, message, input_digest=request.input_digest
    )
