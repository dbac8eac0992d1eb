"""One row's life: pace, send, retry, parse, and turn the replies into an Outcome."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import anyio
from tenacity import RetryCallState

from batcher.client import ChatClient, Reply
from batcher.columns import Outcome
from batcher.config import JobConfig
from batcher.errors import AttemptError
from batcher.flow import FlowController
from batcher.images import ImageError, ImageLoader, inline_images
from batcher.limiter import Cost
from batcher.outcome import OutcomeBuilder, asked_model
from batcher.parse import OutputParser
from batcher.prices import PriceTable
from batcher.request import PROMPT_MARGIN, RowRequest
from batcher.retry import Sleep, retrying
from batcher.tally import Tally


class BudgetStop(Exception):  # noqa: N818 - a signal between worker and runner, not an error
    """Sending this request could cross limits.max_cost_usd; the row stays pending."""


class Halted(Exception):  # noqa: N818 - a signal between worker and runner, not an error
    """The run stopped dispatching while this row waited to retry; the row stays pending."""


class RowWorker:
    """Everything the workers of one run share to process rows."""

    def __init__(
        self,
        config: JobConfig,
        client: ChatClient,
        flow: FlowController,
        images: ImageLoader,
        parser: OutputParser,
        prices: PriceTable,
        tally: Tally,
        *,
        requests_per_row: int,
        sleep: Sleep = anyio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.client = client
        self.flow = flow
        self.images = images
        self.parser = parser
        self.prices = prices
        self.tally = tally
        self.requests_per_row = requests_per_row
        self._sleep = sleep
        self._clock = clock
        self.outcomes = OutcomeBuilder(config, prices, tally)
        # Decoding and resizing are CPU work: more at once than cores only multiplies the
        # decoded pixels held in memory, so image encoding gets one slot per core.
        self._image_slots = anyio.CapacityLimiter(os.cpu_count() or 2)
        self.halted: Callable[[], bool] = lambda: False  # the runner's "stop dispatching"
        max_tokens = config.request.max_tokens
        self._max_completion = max_tokens if max_tokens is not None else 1024
        self._completion_per_row = self._max_completion * (config.request.n or 1)

    async def process(self, request: RowRequest) -> Outcome:
        """Send one row (fan-out included) until it is answered or finally fails."""
        started = self._clock()
        replies: list[Reply] = []
        wasted: list[Reply] = []  # paid for, but their output did not parse
        parsed: dict[str, Any] | None = None
        attempts = 0
        try:
            for _ in range(self.requests_per_row):
                reply, parsed_one, used = await self._request(request, started, wasted)
                attempts += used
                replies.append(reply)
                parsed = parsed if parsed is not None else parsed_one
        except _RowFailed as failure:
            attempts += failure.attempts
            return self.outcomes.failed(
                request, failure.error, attempts, self._clock() - started, replies + wasted
            )
        return self.outcomes.answered(
            request, replies, wasted, parsed, attempts, self._clock() - started
        )

    async def _request(
        self, request: RowRequest, started: float, wasted: list[Reply]
    ) -> tuple[Reply, dict[str, Any] | None, int]:
        retry = self.config.retry
        deadline = started + retry.deadline_s if retry.deadline_s is not None else None
        counts = {"transport": 0, "invalid": 0, "total": 0}

        def stop(state: RetryCallState) -> bool:
            if counts["transport"] >= retry.max_attempts:
                return True
            if counts["invalid"] > retry.invalid_output_attempts:
                return True
            return deadline is not None and self._clock() >= deadline

        async def once() -> tuple[Reply, dict[str, Any] | None, int]:
            counts["total"] += 1
            if counts["total"] > 1:
                self.tally.retries += 1
            try:
                reply = await self._attempt(request, deadline)
            except AttemptError as exc:
                # "Slow down" is not a failure of the row: 429s end only at retry.deadline_s
                # (or when the run stalls), never by using up max_attempts.
                if exc.status != 429:
                    counts["transport"] += 1
                raise
            try:
                parsed = self._parse(reply)
            except AttemptError:
                counts["invalid"] += 1
                wasted.append(reply)
                raise
            return reply, parsed, counts["total"]

        try:
            # Most rows succeed at once: only a failure pays for tenacity's machinery, which
            # then sees that first failure replayed, so its waits and stops count it.
            try:
                return await once()
            except AttemptError as exc:
                if not exc.retryable:
                    raise
                first: AttemptError | None = exc
            async for attempt in retrying(retry, sleep=self._sleep, stop=stop):
                with attempt:
                    if first is not None:
                        replay, first = first, None
                        raise replay
                    return await once()
        except AttemptError as exc:
            error = exc
            if deadline is not None and self._clock() >= deadline and exc.retryable:
                error = AttemptError(
                    "deadline",
                    f"no answer within retry.deadline_s={retry.deadline_s:g} s (last: {exc})",
                    retryable=False,
                )
            raise _RowFailed(error, counts["total"]) from None
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    def _parse(self, reply: Reply) -> dict[str, Any] | None:
        if not self.parser.enabled:
            return None
        return self.parser.parse(reply.first.get("message") or {})

    async def _attempt(self, request: RowRequest, deadline: float | None) -> Reply:
        if self.halted():
            raise Halted
        estimated_cost = self._estimated_cost(request)
        self._reserve_budget(estimated_cost)
        prompt = max(request.estimated_tokens - self._completion_per_row, 0)
        cost = Cost(prompt, self._max_completion * self._choices_per_request)
        try:
            async with self.flow.slot(cost) as slot:
                body = request.body
                if request.images:
                    body, slot.body_bytes = await anyio.to_thread.run_sync(
                        self._with_images, request, limiter=self._image_slots
                    )
                timeout = self.config.endpoint.timeout_s
                if deadline is not None:
                    timeout = max(min(timeout, deadline - self._clock()), 0.001)
                self.tally.requests += 1
                try:
                    with anyio.fail_after(timeout):
                        reply = await self.client.complete(body)
                except TimeoutError:
                    raise AttemptError(
                        "timeout", f"no reply in {timeout:g} s", retryable=True
                    ) from None
                except AttemptError as exc:
                    self.tally.errors[exc.kind] += 1
                    if exc.status == 429:
                        self.tally.rate_limited += 1
                        slot.rate_limited(exc.retry_after_s, exc.limits)
                    elif exc.status is not None:
                        slot.failed(exc.limits)
                    raise
                used = Cost(reply.prompt_tokens or prompt, reply.completion_tokens or 0)
                slot.answered(used, reply.limits)
        finally:
            self.tally.inflight_cost_usd -= estimated_cost
        self.tally.prompt_tokens += reply.prompt_tokens or 0
        self.tally.completion_tokens += reply.completion_tokens or 0
        self.tally.cost_usd += self._cost_of([reply], asked_model(request)) or 0.0
        return reply

    def _with_images(self, request: RowRequest) -> tuple[dict[str, Any], int]:
        """The body with each local image's data URL in place of its digest, and the bytes
        of those URLs (blocking)."""
        try:
            body = inline_images(request, self.images)
        except ImageError as exc:
            raise AttemptError("image_error", str(exc), retryable=False) from None
        parts = body["messages"][-1]["content"]
        return body, sum(len(p["image_url"]["url"]) for p in parts if p.get("type") == "image_url")

    # -- budget -------------------------------------------------------------------------------

    def _estimated_cost(self, request: RowRequest) -> float:
        price = self.prices.get(asked_model(request))
        if self.config.limits.max_cost_usd is None or price is None:
            return 0.0
        # An upper bound: the prompt with the heuristic's margin, every choice at max_tokens.
        prompt = request.estimated_tokens - self._max_completion * (self.config.request.n or 1)
        return price.cost(
            math.ceil(max(prompt, 0) * PROMPT_MARGIN),
            self._max_completion * self._choices_per_request,
        )

    @property
    def _choices_per_request(self) -> int:
        request = self.config.request
        return (request.n or 1) if request.n_mode == "native" else 1

    def _reserve_budget(self, estimated_cost: float) -> None:
        cap = self.config.limits.max_cost_usd
        if (
            cap is not None
            and self.tally.cost_usd + self.tally.inflight_cost_usd + estimated_cost > cap
        ):
            raise BudgetStop
        self.tally.inflight_cost_usd += estimated_cost

    # -- outcomes -----------------------------------------------------------------------------

    def _cost_of(self, replies: list[Reply], asked: str) -> float | None:
        return self.outcomes.cost_of(replies, asked)


class _RowFailed(Exception):  # noqa: N818 - internal control flow
    def __init__(self, error: AttemptError, attempts: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts
