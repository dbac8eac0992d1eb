"""A finished batch's output and error files, matched to rows by ``custom_id`` only.

A 200 line is an answer exactly like a live reply (same parse, same columns). A retryable line
error (5xx, 429, an expired or failed batch, a line the server lost) waits for another
submission until ``retry.max_attempts``; any other 4xx fails its row with the server's message.
Lines cancelled because we asked, and lines refused for the key or the account, go back to
pending without counting.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import orjson

from batcher.config import JobConfig
from batcher.errors import AccountError, BatcherError, KeyRefusedError, shorten
from batcher.rows.request import RowRequest
from batcher.runs.batch.api import BatchApi
from batcher.runs.batch.book import BatchBook, BookRow, ChunkState, RowUpdate
from batcher.send.attempt import AttemptError
from batcher.send.client import classify_status
from batcher.send.outcome import UNMETERED, OutcomeBuilder, unmetered
from batcher.send.parse import OutputParser
from batcher.send.redaction import redact
from batcher.send.reply import Reply, parse_reply
from batcher.store.columns import Outcome

COLLECT_ROWS = 5_000  # rows of a finished batch collected per transaction

# What a line without a result means, by how its batch ended.
_MISSING = {
    "expired": ("batch_expired", "the batch expired before this request ran"),
    "cancelled": ("batch_cancelled", "the batch was cancelled before this request ran"),
    "failed": ("batch_failed", "the batch failed before this request ran"),
    "completed": ("batch_missing", "the completed batch has no result for this request"),
}


@dataclass(frozen=True, slots=True)
class LineResult:
    status: int | None  # the response's status_code; None when the line has only an error
    line: bytes  # the line as it came: parsed again when collected, a slice at a time
    code: str | None = None
    message: str | None = None

    @property
    def body(self) -> bytes:
        """The response body (or the error object) as JSON."""
        data = orjson.loads(self.line)
        response = data.get("response")
        return orjson.dumps(response.get("body") if isinstance(response, dict) else data["error"])


def read_results(*contents: bytes) -> dict[str, LineResult]:
    """Every line of output and error files by custom_id (they come in any order).

    Lines are kept as they came: re-encoding every body up front held ten times the file's
    size in memory (orjson's output buffers), measured on a 50,000-line batch.
    """
    results: dict[str, LineResult] = {}
    for content in contents:
        for raw in content.splitlines():
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue  # a torn line is as good as a missing one: its row is retried
            if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
                continue
            response = line.get("response")
            error = line.get("error")
            status = response.get("status_code") if isinstance(response, dict) else None
            if type(status) is int and 100 <= status <= 599:  # a bool is no status
                results[line["custom_id"]] = LineResult(status, raw)
            elif isinstance(error, dict):
                results[line["custom_id"]] = LineResult(
                    None,
                    raw,
                    code=str(error.get("code") or "batch_error"),
                    message=str(error.get("message") or ""),
                )
    return results


@dataclass(slots=True)
class Collected:
    outcomes: list[Outcome] = field(default_factory=list)
    updates: list[RowUpdate] = field(default_factory=list)
    retry: int = 0
    stop: BatcherError | None = None  # a key or account refusal: stop submitting
    line_errors: Counter[str] = field(default_factory=Counter)


class Collector:
    """Turns one batch's results into outcomes and row states."""

    def __init__(
        self,
        config: JobConfig,
        builder: OutcomeBuilder,
        parser: OutputParser,
        secret: str | None,
    ) -> None:
        self.config = config
        self.builder = builder
        self.parser = parser
        self.secret = secret

    async def collect(
        self,
        rows: list[BookRow],
        results: dict[str, LineResult],
        batch_status: str,
        cancelled_by_us: bool,
    ) -> Collected:
        collected = Collected()
        now = time.time()
        for row in rows:
            result = results.get(row.custom_id)
            request = RowRequest(row.key, {}, row.fingerprint, 0, input_digest=row.input_digest)
            latency_s = max(now - row.first_submitted_at, 0.0)
            if result is not None and result.status == 200:
                try:
                    reply = parse_reply(result.body)
                except AttemptError as exc:
                    self._line_failed(collected, row, request, exc, latency_s)
                    continue
                collected.outcomes.append(await self._answered(request, reply, row, latency_s))
                collected.updates.append(RowUpdate(row.key, "done", row.attempts))
                continue
            if result is not None and result.status is not None:
                try:
                    error = classify_status(
                        httpx.Response(result.status),
                        result.body,
                        self.config.endpoint.api_key_env,
                        self.secret,
                    )
                except (KeyRefusedError, AccountError) as exc:
                    collected.stop = collected.stop or exc
                    self._uncounted(collected, row, str(exc))
                    continue
            else:
                code, message = _MISSING.get(batch_status, _MISSING["completed"])
                if result is not None:
                    # The server's words, kept in the book and the journal: the key out first.
                    code = redact(result.code or code, self.secret)
                    message = shorten(redact(result.message or message, self.secret))
                if code == "batch_cancelled" and cancelled_by_us:
                    self._uncounted(collected, row, f"{code}: {message}")
                    continue
                error = AttemptError(code, message, retryable=True)
            self._line_failed(collected, row, request, error, latency_s)
        return collected

    async def _answered(
        self, request: RowRequest, reply: Reply, row: BookRow, latency_s: float
    ) -> Outcome:
        parsed: dict[str, Any] | None = None
        invalid: AttemptError | None = None
        if self.parser.enabled:
            try:
                parsed = await self.parser.aparse(reply.first.get("message") or {})
            except AttemptError as exc:
                invalid = exc
        # A line without usage is charged what its submission held against the cap.
        charge = row.upper_cost_usd
        if invalid is not None:
            # Resubmitting would cost another day for the same reply: the row fails now.
            outcome = self.builder.failed(
                request, invalid, row.attempts, latency_s, [reply], unmetered_usd=charge
            )
        else:
            outcome = self.builder.answered(
                request, [reply], [], parsed, row.attempts, latency_s, unmetered_usd=charge
            )
        tally = self.builder.tally
        if unmetered(reply):
            tally.warnings[UNMETERED] += 1
        tally.prompt_tokens += max(reply.prompt_tokens or 0, 0)
        tally.completion_tokens += max(reply.completion_tokens or 0, 0)
        tally.cost_usd += max(outcome.cost_usd or 0.0, 0.0)
        return outcome

    def _line_failed(
        self,
        collected: Collected,
        row: BookRow,
        request: RowRequest,
        error: AttemptError,
        latency_s: float,
    ) -> None:
        collected.line_errors[error.kind] += 1
        self.builder.tally.errors[error.kind] += 1
        if error.retryable and row.attempts < self.config.retry.max_attempts:
            collected.retry += 1
            collected.updates.append(
                RowUpdate(row.key, "retry", row.attempts, f"{error.kind}: {error.message}")
            )
            return
        collected.outcomes.append(self.builder.failed(request, error, row.attempts, latency_s, []))
        collected.updates.append(RowUpdate(row.key, "done", row.attempts))

    @staticmethod
    def _uncounted(collected: Collected, row: BookRow, why: str) -> None:
        collected.updates.append(RowUpdate(row.key, "retry", row.attempts - 1, why))


async def collect_batch(
    chunk: ChunkState,
    batch: dict[str, Any],
    api: BatchApi,
    book: BatchBook,
    collector: Collector,
    advance: Callable[[int], None],
    settled: Callable[[Outcome], None] = lambda _outcome: None,
) -> BatcherError | None:
    """Collect a batch that ended: every line that completed is kept, whatever the end; each
    outcome committed goes to ``settled``. Returns a key or account refusal found among its
    lines (the run stops submitting)."""
    status = str(batch.get("status"))
    contents = []
    for field_name in ("output_file_id", "error_file_id"):
        if batch.get(field_name):
            contents.append(await api.content(str(batch[field_name])))
    results = read_results(*contents)
    del contents
    rows = await anyio.to_thread.run_sync(book.rows_in, chunk.name)
    stop: BatcherError | None = None
    # In slices, each committed with its rows' states: a 50,000-line batch's outcomes are
    # never all in memory, and a run killed midway collects only the rest next time.
    for start in range(0, max(len(rows), 1), COLLECT_ROWS):
        part = rows[start : start + COLLECT_ROWS]
        collected = await collector.collect(part, results, status, chunk.cancel_requested)
        last = start + COLLECT_ROWS >= len(rows)
        await anyio.to_thread.run_sync(
            book.collect,
            chunk.name,
            status if last else None,
            collected.outcomes,
            collected.updates,
        )
        advance(len(collected.outcomes))
        for outcome in collected.outcomes:
            settled(outcome)
        stop = stop or collected.stop
    return stop
