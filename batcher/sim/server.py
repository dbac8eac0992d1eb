"""The simulator's HTTP side: rate buckets, fault injection, streaming, what it saw."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
from aiohttp import web

from batcher.sim.admin import make_app
from batcher.sim.batches import BatchService
from batcher.sim.faults import error_response, fault_for, inject, violates_schema
from batcher.sim.limits import Limits
from batcher.sim.replies import build_reply, user_text
from batcher.sim.seen import count_prompt
from batcher.sim.stream import stream_reply

_MAX_IMAGE_LOG = 10_000


@dataclass(slots=True)
class SimSettings:
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    burst_s: float = 1.0
    fail_share: float = 0.0
    fail_attempts_min: int = 1
    fail_attempts_max: int = 3
    faults: tuple[str, ...] = ("429", "500", "503", "drop", "stall", "malformed")
    stall_s: float = 600.0
    retry_after_s: float = 0.1
    cached_share: float = 0.0  # share of prompt tokens reported as cached
    # Share of structured replies (tools, response_format json_schema) that break the schema.
    schema_violation_share: float = 0.0
    seed: int = 0
    limiter: str = "bucket"  # bucket, window (fixed) or sliding; see sim/limits.py
    window_s: float = 60.0  # the window of the window and sliding limiters
    limit_retry_after_s: float | None = None  # Retry-After of limit 429s; None: the exact wait
    send_retry_after: bool = True  # False: limit 429s carry no Retry-After at all
    ratelimit_headers: str | None = None  # advertise limits in headers: openai or anthropic
    random_429_share: float = 0.0  # 429s on this share of requests, whatever the rate
    # (seconds after the first request, requests/minute from then on): a limit that moves
    schedule: tuple[tuple[float, float], ...] = ()
    record_bodies: bool = False  # keep every request body, for tests that compare them
    # The Batch API (batcher.sim.batches): whether it is served, how long a batch takes, the
    # share of lines whose first submission fails with 500, which batches (1-based, in order
    # of creation) expire half done, the upload and batch sizes it refuses, and how long it
    # waits between storing an upload or a batch and answering (for kills in between).
    batch_api: bool = True
    batch_delay_s: float = 0.0
    batch_reply_delay_s: float = 0.0
    batch_fail_share: float = 0.0
    batch_expire: tuple[int, ...] = ()
    batch_max_file_bytes: int | None = None
    batch_max_lines: int | None = None


class Refusal(NamedTuple):
    """A 429 met on arrival: its message and Retry-After (None: the header is left out)."""

    message: str
    retry_after_s: float | None


class Simulator:
    """The server's state: settings, rate buckets, and what it saw. ``clock`` times its limits
    and answers (tests on virtual time pass the run's clock and serve it without a socket)."""

    def __init__(
        self, settings: SimSettings | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings or SimSettings()
        self.clock = clock
        self.batches = BatchService(self)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen, limits and batches included: as good as new."""
        s = self.settings
        self._random = random.Random(s.seed)
        self.batches.reset()
        self.requests = 0
        self.answered = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.statuses: Counter[str] = Counter()
        self.attempts: Counter[str] = Counter()
        self.answered_by_prompt: Counter[str] = Counter()
        self.usage_by_prompt: dict[str, dict[str, int]] = {}
        self.answered_at: list[float] = []  # monotonic times of answers, for achieved rates
        self.answered_tokens: list[int] = []
        self.images: list[dict[str, Any]] = []
        self.authorization: Counter[str] = Counter()
        self.bodies: list[dict[str, Any]] = []
        self.limits = Limits(s, self.clock)

    def set_limits(
        self, requests_per_minute: float | None, tokens_per_minute: float | None
    ) -> None:
        """Enforce these limits from now on (None: that budget unlimited)."""
        self.limits.set(requests_per_minute, tokens_per_minute)

    def achieved_rps(self) -> float:
        """Answers per second between the first and the last answer."""
        return _per_second(self.answered_at, [1] * len(self.answered_at))

    def achieved_tps(self) -> float:
        """Tokens (prompt + completion) per second between the first and the last answer."""
        return _per_second(self.answered_at, self.answered_tokens)

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "answered": self.answered,
            "in_flight": self.in_flight,  # arrived and not yet answered
            "max_in_flight": self.max_in_flight,
            "achieved_rps": self.achieved_rps(),
            "statuses": dict(self.statuses),
            "attempts": dict(self.attempts),
            "answered_by_prompt": dict(self.answered_by_prompt),
            "usage_by_prompt": dict(self.usage_by_prompt),
            "images": self.images,
            "authorization": dict(self.authorization),
            **({"bodies": self.bodies} if self.settings.record_bodies else {}),
        }

    def app(self) -> web.Application:
        return make_app(self)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``POST /chat/completions``."""
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        s = self.settings
        raw = await request.read()
        auth = request.headers.get("Authorization", "")
        self.authorization["bearer" if auth.startswith("Bearer ") else "none"] += 1
        try:
            body = orjson.loads(raw)
            messages = body["messages"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return error_response(
                400, "invalid_request_error", "body is not a chat-completions request"
            )
        if s.record_bodies:
            self.bodies.append(body)
        prompt = user_text(messages)
        self.attempts[prompt] += 1
        attempt = self.attempts[prompt]
        marked = _marked_reply(prompt, auth, bool(body.get("stream")))
        if marked is not None:
            status, response = marked
            self.statuses[status] += 1
            return response
        prompt_tokens = self.count_prompt(messages)
        refusal = self.refusal(body, prompt_tokens)
        if refusal is not None:
            return self._error(429, "rate_limit_error", *refusal)
        latency_s = self.latency_s()
        if latency_s:
            await asyncio.sleep(latency_s)
        fault = fault_for(s, raw, attempt)
        streaming_fault = fault in ("cut", "silence") and body.get("stream")
        if fault is not None and not streaming_fault:
            fault = "stall" if fault == "silence" else fault
            self.statuses[fault] += 1
            if fault == "429":
                return self._error(429, "rate_limit_error", "simulated rate limit", s.retry_after_s)
            return await inject(request, fault, s)
        reply = self.build_reply(body, prompt, prompt_tokens, attempt)
        if body.get("stream"):
            response, broken = await stream_reply(
                request,
                body,
                reply,
                headers=self.limits.advertised(),
                fault=fault,
                stall_s=s.stall_s,
                on_break=lambda: self.statuses.update([str(fault)]),
            )
            if not broken:
                self.count_answer(prompt, reply)
            return response
        self.count_answer(prompt, reply)
        return web.Response(
            body=orjson.dumps(reply),
            content_type="application/json",
            headers=self.limits.advertised(),
        )

    def refusal(self, body: dict[str, Any], prompt_tokens: int) -> Refusal | None:
        """The 429 a request meets on arrival, if any, counted: limits are checked on arrival,
        as real servers do (a 429 does not wait for the model), after the random ones."""
        s = self.settings
        self.limits.follow_schedule()
        if s.random_429_share and self._random.random() < s.random_429_share:
            self.statuses["429"] += 1
            self.statuses["429 random"] += 1
            return Refusal("upstream busy", s.retry_after_s)
        max_tokens = int(body.get("max_tokens") or 1024)
        wait_s = self.limits.admit(prompt_tokens + max_tokens)
        if wait_s > 0:
            self.statuses["429"] += 1
            return Refusal("rate limit exceeded", self.limits.retry_after(wait_s))
        return None

    def latency_s(self) -> float:
        """How long the model takes over this request."""
        s = self.settings
        if not (s.latency_s or s.latency_jitter_s):
            return 0.0
        return s.latency_s + self._random.uniform(0, s.latency_jitter_s)

    def build_reply(
        self, body: dict[str, Any], prompt: str, prompt_tokens: int, attempt: int = 1
    ) -> dict[str, Any]:
        """The reply's JSON (of the prompt's ``attempt``-th request); the tokens that
        max_tokens reserved and it did not use go back."""
        s = self.settings
        violate = violates_schema(s, body.get("messages"), attempt)
        reply = build_reply(body, prompt, prompt_tokens, s.cached_share, violate=violate)
        max_tokens = int(body.get("max_tokens") or 1024)
        self.limits.give_back_tokens(max(max_tokens - reply["usage"]["completion_tokens"], 0))
        return reply

    def count_prompt(self, messages: list[dict[str, Any]]) -> int:
        """Prompt tokens, each image logged as it arrived (the first ``_MAX_IMAGE_LOG``)."""
        tokens = count_prompt(messages, self.images)
        del self.images[_MAX_IMAGE_LOG:]
        return tokens

    def count_answer(self, prompt: str, reply: dict[str, Any]) -> None:
        """One answer sent: counted by prompt, its time and tokens kept for achieved rates."""
        self.statuses["200"] += 1
        self.answered += 1
        self.answered_by_prompt[prompt] += 1
        self.usage_by_prompt[prompt] = reply["usage"]
        self.answered_at.append(self.clock())
        self.answered_tokens.append(reply["usage"]["total_tokens"])

    def _error(
        self, status: int, kind: str, message: str, retry_after_s: float | None
    ) -> web.Response:
        return error_response(
            status, kind, message, retry_after_s=retry_after_s, headers=self.limits.advertised()
        )


# Markers a prompt can carry to get a fixed reply: servers that echo the Authorization header
# (in another letter case, in a 200 that is not JSON, in a stream's error chunk) and errors
# whose words or codes speak of credit, quota or billing.
_MARKED: dict[str, tuple[int, str, str]] = {
    "[[sim:echo400]]": (400, "invalid_request_error", "bad header: AUTHORIZATION: {upper}"),
    "[[sim:credit400]]": (400, "invalid_request_error", "a review about a credit card balance"),
    "[[sim:billing503]]": (503, "api_error", "billing service unavailable"),
    "[[sim:quota429]]": (429, "insufficient_quota", "You exceeded your current quota"),
    "[[sim:billing400]]": (400, "billing_hard_limit_reached", "Billing hard limit reached"),
}


def _marked_reply(prompt: str, auth: str, stream: bool) -> tuple[str, web.StreamResponse] | None:
    """The fixed reply a marker in the prompt asks for, and how the stats count it."""
    for marker, status, message in (
        ("[[sim:401]]", 401, f"invalid x-api-key {auth.removeprefix('Bearer ')}"),
        ("[[sim:402]]", 402, "Your credit balance is too low"),
        ("[[sim:400]]", 400, "messages: this request was refused as invalid"),
    ):
        if marker in prompt:
            return str(status), error_response(status, "invalid_request_error", message)
    reply = _other_marked_reply(prompt, auth, stream)
    return ("marked", reply) if reply is not None else None


def _other_marked_reply(prompt: str, auth: str, stream: bool) -> web.StreamResponse | None:
    if "[[sim:echo200]]" in prompt:
        page = f"<html><body>proxy error; you sent Authorization: {auth}</body></html>"
        return web.Response(body=page.encode(), content_type="text/html")
    if "[[sim:echostream]]" in prompt and stream:
        chunk = orjson.dumps({"error": {"message": f"upstream refused {auth.lower()}"}})
        return web.Response(body=b"data: " + chunk + b"\n\n", content_type="text/event-stream")
    for marker, (status, kind, message) in _MARKED.items():
        if marker in prompt:
            return error_response(status, kind, message.format(upper=auth.upper()))
    return None


def _per_second(times: list[float], amounts: list[int]) -> float:
    """What came after the first of ``times``, per second until the last."""
    if len(times) < 2 or times[-1] <= times[0]:
        return 0.0
    return sum(amounts[1:]) / (times[-1] - times[0])
