"""One paced attempt: a flow-controller slot, the row's images inlined inside it, the client's
call under the attempt's timeout, and the slot told how the attempt ended. Nothing is sent once
the flow has halted: a slot granted after the stop raises ``Halted`` instead."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import anyio

from batcher.config import JobConfig
from batcher.flow.controller import FlowController, Halted
from batcher.flow.limiter import Cost
from batcher.flow.server_limits import ServerLimits
from batcher.rows.images import ImageError, ImageLoader, inline_images
from batcher.rows.request import RequestBuilder, RowRequest
from batcher.send.attempt import AttemptError
from batcher.send.client import ChatClient
from batcher.send.reply import Reply
from batcher.send.tally import Tally


class Sender:
    """Sends attempts for one run: pacing, images, timeout, and the tally of requests."""

    def __init__(
        self,
        client: ChatClient,
        flow: FlowController,
        images: ImageLoader,
        tally: Tally,
        *,
        timeout_s: float,
        completion_per_row: int,
        completion_per_request: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.flow = flow
        self.images = images
        self.tally = tally
        self.timeout_s = timeout_s
        self.completion_per_row = completion_per_row
        self.completion_per_request = completion_per_request
        self._clock = clock
        # Decoding and resizing are CPU work: more at once than cores only multiplies the
        # decoded pixels held in memory, so image encoding gets one slot per core.
        self._image_slots = anyio.CapacityLimiter(os.cpu_count() or 2)

    @classmethod
    def for_job(
        cls,
        config: JobConfig,
        builder: RequestBuilder,
        client: ChatClient,
        flow: FlowController,
        images: ImageLoader,
        tally: Tally,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> Sender:
        return cls(
            client,
            flow,
            images,
            tally,
            timeout_s=config.endpoint.timeout_s,
            completion_per_row=builder.completion_tokens,
            completion_per_request=builder.max_completion * builder.choices_per_request,
            clock=clock,
        )

    async def send(self, request: RowRequest, deadline: float | None) -> Reply:
        """One attempt; raises AttemptError (or the run's KeyRefusedError/AccountError), or
        Halted when the run stopped before it could be sent."""
        prompt = max(request.estimated_tokens - self.completion_per_row, 0)
        async with self.flow.slot(Cost(prompt, self.completion_per_request)) as slot:
            body = request.body
            if request.images:
                body, slot.body_bytes = await anyio.to_thread.run_sync(
                    self._with_images, request, limiter=self._image_slots
                )
                if self.flow.halted:
                    raise Halted  # stopped while the images were encoded: not sent
            timeout = self.timeout_s
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
                    slot.failed(exc.limits, exc.retry_after_s)
                if exc.limits is not None and exc.limits.ignored:
                    self._count_ignored(exc.limits)
                raise
            if reply.limits is not None and reply.limits.ignored:
                self._count_ignored(reply.limits)
            slot.answered(
                Cost(reply.prompt_tokens or prompt, reply.completion_tokens or 0), reply.limits
            )
        return reply

    def _count_ignored(self, limits: ServerLimits) -> None:
        """Headers the reply sent that could not be read as limits: a warning each."""
        for warning in limits.ignored:
            self.tally.warnings[warning] += 1

    def _with_images(self, request: RowRequest) -> tuple[dict[str, Any], int]:
        """The body with each local image's data URL in place of its digest, and the bytes
        of those URLs (blocking)."""
        try:
            body = inline_images(request, self.images)
        except ImageError as exc:
            raise AttemptError("image_error", str(exc), retryable=False) from None
        parts = body["messages"][-1]["content"]
        return body, sum(len(p["image_url"]["url"]) for p in parts if p.get("type") == "image_url")
