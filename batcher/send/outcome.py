"""A row's Outcome from its replies or its last error: the output columns, the cost, the tally.

Shared by the live workers and the Batch API collector (and so by ``--ray``'s shards, which run
the live engine), so a row means the same whichever way it was sent; only the price table
differs (list or batch prices). Every Outcome leaves here with the API key out of its texts.
"""

from __future__ import annotations

from typing import Any

import orjson

from batcher.config import JobConfig
from batcher.rows.request import RowRequest
from batcher.send.attempt import AttemptError
from batcher.send.prices import Price, PriceTable
from batcher.send.redaction import redactor_for
from batcher.send.reply import Reply
from batcher.send.tally import Tally
from batcher.store.columns import INTERRUPTED, Outcome, Usage

# The summary's line for replies that came without usage, counted once per reply.
UNMETERED = (
    "a reply came without usage: charged its request's worst case (its row's cost_usd "
    "counts it, its token columns are null)"
)


def unmetered(reply: Reply) -> bool:
    """Whether ``reply`` says too little of its usage to be priced."""
    return reply.prompt_tokens is None or reply.completion_tokens is None


class OutcomeBuilder:
    """Turns replies into Outcomes for one run, counting them in its tally."""

    def __init__(
        self, config: JobConfig, prices: PriceTable, tally: Tally, *, secret: str | None = None
    ) -> None:
        """``secret``: the API key, blanked out of every Outcome (a server may echo it)."""
        self.config = config
        self.prices = prices
        self.tally = tally
        self.redactor = redactor_for(secret)
        self._unpriced: set[str] = set()

    def price_for(self, model: str | None, asked: str) -> Price | None:
        # The model the server answered with, else the one asked: each row at its own price.
        price = self.prices.get(model) or self.prices.get(asked)
        if price is None:
            name = self.redactor.text(model or asked)
            if name not in self._unpriced:
                self._unpriced.add(name)
                self.tally.warnings[f"no price for model {name}: cost_usd is null"] += 1
        return price

    def cost_of(self, replies: list[Reply], asked: str, unmetered_usd: float = 0.0) -> float | None:
        """What ``replies`` cost; one without usage costs ``unmetered_usd``, its request's
        worst case, as the budget held it (a server that does not say is not free)."""
        total = 0.0
        for reply in replies:
            price = self.price_for(reply.model, asked)
            if price is None:
                return None
            if unmetered(reply):
                total += unmetered_usd
                continue
            total += price.cost(
                reply.prompt_tokens or 0, reply.completion_tokens or 0, reply.cached_tokens or 0
            )
        return total

    def usage_of(
        self,
        paid: list[Reply],
        asked: str,
        model: str | None,
        costs: list[float | None] | None = None,
        unmetered_usd: float = 0.0,
    ) -> Usage:
        """Tokens and cost summed over every paid reply; ``model`` is the one answering.
        ``costs``: each paid reply's cost in the same order, when the caller priced them;
        ``unmetered_usd``: what one without usage costs (``cost_of``)."""
        cost_usd = self.cost_of(paid, asked, unmetered_usd) if costs is None else _total(costs)
        if len(paid) == 1:
            # Nearly every row has one paid reply: its figures as they are, without the sums'
            # generators (a sum of one is the value itself; absent stays None).
            reply = paid[0]
            return Usage(
                model,
                reply.prompt_tokens,
                reply.completion_tokens,
                reply.total_tokens,
                reply.cached_tokens,
                cost_usd,
            )
        return Usage(
            model=model,
            prompt_tokens=_sum(r.prompt_tokens for r in paid),
            completion_tokens=_sum(r.completion_tokens for r in paid),
            total_tokens=_sum(r.total_tokens for r in paid),
            cached_tokens=_sum(r.cached_tokens for r in paid),
            cost_usd=cost_usd,
        )

    def answered(
        self,
        request: RowRequest,
        replies: list[Reply],
        wasted: list[Reply],
        parsed: dict[str, Any] | None,
        attempts: int,
        latency_s: float,
        *,
        costs: list[float | None] | None = None,
        unmetered_usd: float = 0.0,
    ) -> Outcome:
        """``costs``: what each of ``replies + wasted`` cost, when the caller priced them;
        ``unmetered_usd``: what one of them without usage costs."""
        first = replies[0]
        paid = replies + wasted
        choices = [choice for reply in replies for choice in reply.choices]
        failing = self._failing_finish(choices)
        if failing is not None:
            # Not retried: the same request ends the same way. The text stays in `response`.
            error = AttemptError("finish_reason", failing, retryable=False)
            content = (choices[0].get("message") or {}).get("content")
            return self.failed(
                request,
                error,
                attempts,
                latency_s,
                paid,
                response=content,
                unmetered_usd=unmetered_usd,
            )
        wanted = self.config.request.n or 1
        if len(choices) < wanted:
            self.tally.warnings[f"asked for n={wanted} choices, a reply carried fewer"] += 1
        message = choices[0].get("message") or {}
        extra: dict[str, Any] = {}
        if message.get("tool_calls"):
            extra["tool_calls"] = orjson.dumps(message["tool_calls"]).decode()
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if reasoning:
            extra["reasoning"] = reasoning
        if wanted > 1:
            extra["responses"] = [(c.get("message") or {}).get("content") for c in choices]
            extra["all_tool_calls"] = [
                orjson.dumps(calls).decode()
                if (calls := (c.get("message") or {}).get("tool_calls"))
                else None
                for c in choices
            ]
        if first.ttft_s is not None:
            extra["ttft_s"] = first.ttft_s
        if parsed is not None:
            extra["parsed"] = parsed
        self.tally.ok += 1
        return self._counted(
            Outcome.answered(
                request.key,
                request.fingerprint,
                response=message.get("content"),
                finish_reason=choices[0].get("finish_reason"),
                usage=self.usage_of(paid, asked_model(request), first.model, costs, unmetered_usd),
                latency_s=latency_s,
                attempts=attempts,
                response_id=first.response_id,
                extra=extra or None,
                input_digest=request.input_digest,
            )
        )

    def _counted(self, outcome: Outcome) -> Outcome:
        """``outcome``, its unknown cost counted in the tally (a sum of costs leaves it out),
        with the key out of its texts: every Outcome leaves the builder through here."""
        if outcome.unpriced:
            self.tally.unpriced_rows += 1
        return self.redactor.outcome(outcome)

    def _failing_finish(self, choices: list[dict[str, Any]]) -> str | None:
        """The first finish reason among ``choices`` that output.fail_on_finish names."""
        failing = self.config.output.fail_on_finish
        for choice in choices if failing else ():
            reason = choice.get("finish_reason")
            if reason in failing:
                return str(reason)
        return None

    def failed(
        self,
        request: RowRequest,
        error: AttemptError,
        attempts: int,
        latency_s: float,
        paid: list[Reply],
        *,
        response: str | None = None,
        unmetered_usd: float = 0.0,
    ) -> Outcome:
        self.tally.failed += 1
        self.tally.errors[f"final:{error.kind}"] += 1
        raw = response
        if error.kind == "invalid_output" and paid:
            # The raw reply stays in `response` so the user can see what did not parse.
            message = paid[-1].first.get("message") or {}
            raw = message.get("content")
            if raw is None and message.get("tool_calls"):
                raw = orjson.dumps(message["tool_calls"]).decode()
        return self._counted(
            Outcome.failed(
                request.key,
                request.fingerprint,
                error.kind,
                error.message,
                input_digest=request.input_digest,
                attempts=attempts,
                latency_s=latency_s,
                usage=self.usage_of(
                    paid, asked_model(request), paid[-1].model, unmetered_usd=unmetered_usd
                )
                if paid
                else None,
                response=raw,
                finish_reason=error.message if error.kind == "finish_reason" else None,
            )
        )

    def interrupted(
        self,
        request: RowRequest,
        attempts: int,
        latency_s: float,
        paid: list[Reply],
        *,
        unmetered_usd: float = 0.0,
    ) -> Outcome:
        """A row the run stopped before it was done, after it paid for ``paid``: recorded, so
        the journal counts that spend and keeps the last reply's text, and failed with kind
        ``interrupted``, so the next run sends the row again (as a whole, since a row's columns
        come from one run's replies)."""
        self.tally.failed += 1
        self.tally.errors[f"final:{INTERRUPTED}"] += 1
        message = paid[-1].first.get("message") or {}
        return self._counted(
            Outcome.failed(
                request.key,
                request.fingerprint,
                INTERRUPTED,
                "the run stopped before this row was done; run again to send it",
                input_digest=request.input_digest,
                attempts=attempts,
                latency_s=latency_s,
                usage=self.usage_of(
                    paid, asked_model(request), paid[-1].model, unmetered_usd=unmetered_usd
                ),
                response=message.get("content"),
            )
        )


def asked_model(request: RowRequest) -> str:
    """The model a row's request asks for."""
    return str(request.body.get("model"))


def _total(costs: list[float | None]) -> float | None:
    """What ``cost_of`` gives for replies of these costs (None: one is unpriced)."""
    total = 0.0
    for cost in costs:
        if cost is None:
            return None
        total += cost
    return total


def _sum(values: Any) -> int | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None
