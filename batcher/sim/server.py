"""The simulator's HTTP side: rate buckets, fault injection, streaming, what it saw."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from batcher.images import sniff_mime
from batcher.sim.batches import BatchService
from batcher.sim.limits import Meter, advertise, meter
from batcher.sim.replies import build_reply, count_tokens, digest, user_text

FAULT_KINDS = (
    "429",
    "500",
    "502",
    "503",
    "504",
    "529",
    "drop",
    "stall",
    "malformed",
    "nochoices",
    "cut",  # a stream that breaks midway (a dropped connection when not streaming)
    "silence",  # a stream that goes quiet midway for stall_s (a stall when not streaming)
)
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


class Simulator:
    """The server's state: settings, rate buckets, and what it saw."""

    def __init__(self, settings: SimSettings | None = None) -> None:
        self.settings = settings or SimSettings()
        self._random = random.Random(self.settings.seed)
        self.reset()
        self.batches = BatchService(self)

    def reset(self) -> None:
        s = self.settings
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
        self.meters: dict[str, Meter] = {}
        self._first_request: float | None = None
        self._schedule = sorted(s.schedule)
        self.set_limits(s.requests_per_minute, s.tokens_per_minute)

    def set_limits(
        self, requests_per_minute: float | None, tokens_per_minute: float | None
    ) -> None:
        """Enforce these limits from now on (None: that budget unlimited)."""
        s, now = self.settings, time.monotonic()
        for budget, per_minute in (
            ("requests", requests_per_minute),
            ("tokens", tokens_per_minute),
        ):
            if per_minute is None:
                self.meters.pop(budget, None)
            elif budget in self.meters:
                self.meters[budget].per_minute = per_minute
            else:
                self.meters[budget] = meter(
                    s.limiter, per_minute, burst_s=s.burst_s, window_s=s.window_s, now=now
                )

    def achieved_rps(self) -> float:
        """Answers per second between the first and the last answer."""
        times = self.answered_at
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    def achieved_tps(self) -> float:
        """Tokens (prompt + completion) per second between the first and the last answer."""
        times = self.answered_at
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return sum(self.answered_tokens[1:]) / (times[-1] - times[0])

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "answered": self.answered,
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
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/chat/completions", self._handle)
        app.router.add_get("/sim/stats", self._stats)
        app.router.add_post("/sim/reset", self._reset)
        app.router.add_post("/sim/limits", self._set_limits)
        if self.settings.batch_api:
            self.batches.register(app)
        return app

    async def _stats(self, _: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats()), content_type="application/json")

    async def _set_limits(self, request: web.Request) -> web.Response:
        wanted = orjson.loads(await request.read())
        self.set_limits(wanted.get("requests_per_minute"), wanted.get("tokens_per_minute"))
        return web.Response(body=b"{}", content_type="application/json")

    async def _reset(self, _: web.Request) -> web.Response:
        self.reset()
        return web.Response(body=b"{}", content_type="application/json")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
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
            return _error(400, "invalid_request_error", "body is not a chat-completions request")
        if s.record_bodies:
            self.bodies.append(body)
        prompt = user_text(messages)
        self.attempts[prompt] += 1
        attempt = self.attempts[prompt]
        for marker, status, message in (
            ("[[sim:401]]", 401, f"invalid x-api-key {auth.removeprefix('Bearer ')}"),
            ("[[sim:402]]", 402, "Your credit balance is too low"),
            ("[[sim:400]]", 400, "messages: this request was refused as invalid"),
        ):
            if marker in prompt:
                self.statuses[str(status)] += 1
                return _error(status, "invalid_request_error", message)
        marked = _marked_reply(prompt, auth, bool(body.get("stream")))
        if marked is not None:
            self.statuses["marked"] += 1
            return marked
        # Limits are checked on arrival, as real servers do: a 429 does not wait for the model.
        self._follow_schedule()
        if s.random_429_share and self._random.random() < s.random_429_share:
            self.statuses["429"] += 1
            self.statuses["429 random"] += 1
            return self._error(429, "rate_limit_error", "upstream busy", s.retry_after_s)
        prompt_tokens = self._count_prompt(messages)
        max_tokens = int(body.get("max_tokens") or 1024)
        limited = self._admit(prompt_tokens + max_tokens)
        if limited is not None:
            return limited
        if s.latency_s or s.latency_jitter_s:
            await asyncio.sleep(s.latency_s + self._random.uniform(0, s.latency_jitter_s))
        fault = self._fault_for(raw, attempt)
        streaming_fault = fault in ("cut", "silence") and body.get("stream")
        if fault is not None and not streaming_fault:
            return await self._fault(request, "stall" if fault == "silence" else fault)
        reply = build_reply(body, prompt, prompt_tokens, s.cached_share)
        completion = reply["usage"]["completion_tokens"]
        if "tokens" in self.meters:
            self.meters["tokens"].give_back(max(max_tokens - completion, 0), time.monotonic())
        if body.get("stream"):
            return await self._stream(request, body, reply, fault=fault)
        self._count_answer(prompt, reply)
        return web.Response(
            body=orjson.dumps(reply), content_type="application/json", headers=self._advertised()
        )

    def _count_answer(self, prompt: str, reply: dict[str, Any]) -> None:
        self.statuses["200"] += 1
        self.answered += 1
        self.answered_by_prompt[prompt] += 1
        self.usage_by_prompt[prompt] = reply["usage"]
        self.answered_at.append(time.monotonic())
        self.answered_tokens.append(reply["usage"]["total_tokens"])

    def _fault_for(self, raw: bytes, attempt: int) -> str | None:
        s = self.settings
        if s.fail_share <= 0 or not s.faults:
            return None
        # Same request bytes, same fate: retries of a failing row fail its first k attempts.
        canonical = raw.replace(b'"stream":true,', b"")
        h = digest(canonical, s.seed)
        if (h % 10_000) / 10_000 >= s.fail_share:
            return None
        failing = s.fail_attempts_min + (h >> 16) % (s.fail_attempts_max - s.fail_attempts_min + 1)
        if attempt > failing:
            return None
        return s.faults[((h >> 24) + attempt) % len(s.faults)]

    async def _fault(self, request: web.Request, fault: str) -> web.StreamResponse:
        self.statuses[fault] += 1
        s = self.settings
        if fault == "429":
            return self._error(429, "rate_limit_error", "simulated rate limit", s.retry_after_s)
        if fault.isdigit():
            retry_after = s.retry_after_s if fault == "503" else None
            return _error(int(fault), "api_error", f"simulated {fault}", retry_after_s=retry_after)
        if fault == "stall":
            await asyncio.sleep(s.stall_s)
            return _error(504, "api_error", "stalled")
        if fault == "malformed":
            return web.Response(
                body=b'{"id": "broken", "choices": [{"mess', content_type="application/json"
            )
        if fault == "nochoices":
            return web.Response(
                body=b'{"id": "empty", "choices": []}', content_type="application/json"
            )
        # drop (and cut for a non-streaming request): close the socket without a reply.
        if request.transport is not None:
            request.transport.close()
        raise asyncio.CancelledError

    def _follow_schedule(self) -> None:
        now = time.monotonic()
        if self._first_request is None:
            self._first_request = now
        while self._schedule and now - self._first_request >= self._schedule[0][0]:
            _, per_minute = self._schedule.pop(0)
            self.set_limits(per_minute, self.settings.tokens_per_minute)

    def _admit(self, tokens: int) -> web.Response | None:
        now = time.monotonic()
        charged: list[tuple[Meter, float]] = []
        for budget, cost in (("requests", 1), ("tokens", tokens)):
            found = self.meters.get(budget)
            if found is None:
                continue
            wait = found.take(cost, now)
            if wait > 0:
                for earlier, amount in charged:  # refused: charge nothing
                    earlier.give_back(amount, now)
                return self._limited(wait)
            charged.append((found, cost))
        return None

    def _limited(self, wait_s: float) -> web.Response:
        self.statuses["429"] += 1
        s = self.settings
        retry_after = s.limit_retry_after_s if s.limit_retry_after_s is not None else wait_s
        return self._error(
            429,
            "rate_limit_error",
            "rate limit exceeded",
            retry_after if s.send_retry_after else None,
        )

    def _advertised(self) -> dict[str, str] | None:
        style = self.settings.ratelimit_headers
        if style is None or not self.meters:
            return None
        return advertise(style, self.meters, time.monotonic())

    def _error(
        self, status: int, kind: str, message: str, retry_after_s: float | None
    ) -> web.Response:
        response = _error(status, kind, message, retry_after_s=retry_after_s)
        response.headers.update(self._advertised() or {})
        return response

    def _count_prompt(self, messages: list[dict[str, Any]]) -> int:
        tokens = 0
        for message in messages:
            content = message.get("content")
            tokens += 3
            if isinstance(content, str):
                tokens += count_tokens(content)
                continue
            for part in content or []:
                if part.get("type") == "text":
                    tokens += count_tokens(part.get("text", ""))
                elif part.get("type") == "image_url":
                    tokens += self._see_image(str((part.get("image_url") or {}).get("url", "")))
        return tokens

    def _see_image(self, url: str) -> int:
        """Log what arrived and count its tokens as Anthropic bills them."""
        entry: dict[str, Any] = {"url": url if not url.startswith("data:") else None}
        width = height = 0
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            declared = header[5:].split(";")[0]
            data = base64.b64decode(payload)
            entry.update(declared=declared, sniffed=sniff_mime(data[:16]), bytes=len(data))
            try:
                from PIL import Image

                with Image.open(io.BytesIO(data)) as image:
                    width, height = image.size
            except Exception:
                width = height = 0
            entry.update(width=width, height=height)
        if len(self.images) < _MAX_IMAGE_LOG:
            self.images.append(entry)
        return max(1, width * height // 750) if width else 1600

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        reply: dict[str, Any],
        *,
        fault: str | None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", **(self._advertised() or {})}
        )
        await response.prepare(request)
        base = {k: reply[k] for k in ("id", "created", "model")} | {
            "object": "chat.completion.chunk"
        }

        async def send(chunk: dict[str, Any] | str) -> None:
            data = chunk if isinstance(chunk, str) else orjson.dumps(base | chunk).decode()
            await response.write(f"data: {data}\n\n".encode())

        for choice in reply["choices"]:
            index = choice["index"]
            message = choice["message"]
            await send({"choices": [{"index": index, "delta": {"role": "assistant"}}]})
            if message.get("reasoning_content"):
                await send(
                    {
                        "choices": [
                            {
                                "index": index,
                                "delta": {"reasoning_content": message["reasoning_content"]},
                            }
                        ]
                    }
                )
            for call_index, call in enumerate(message.get("tool_calls") or []):
                arguments = call["function"]["arguments"]
                half = len(arguments) // 2
                head = {
                    "index": call_index,
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": arguments[:half]},
                }
                await send({"choices": [{"index": index, "delta": {"tool_calls": [head]}}]})
                tail = {"index": call_index, "function": {"arguments": arguments[half:]}}
                await send({"choices": [{"index": index, "delta": {"tool_calls": [tail]}}]})
            content = message.get("content") or ""
            pieces = [content[i : i + 12] for i in range(0, len(content), 12)]
            for number, piece in enumerate(pieces):
                if fault and number == len(pieces) // 2:
                    self.statuses[fault] += 1
                    if fault == "silence":
                        await asyncio.sleep(self.settings.stall_s)
                    if request.transport is not None:
                        request.transport.close()
                    return response
                await send({"choices": [{"index": index, "delta": {"content": piece}}]})
            await send(
                {
                    "choices": [
                        {"index": index, "delta": {}, "finish_reason": choice["finish_reason"]}
                    ]
                }
            )
        if (body.get("stream_options") or {}).get("include_usage"):
            await send({"choices": [], "usage": reply["usage"]})
        await send("[DONE]")
        self._count_answer(user_text(body["messages"]), reply)
        await response.write_eof()
        return response


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


def _marked_reply(prompt: str, auth: str, stream: bool) -> web.StreamResponse | None:
    if "[[sim:echo200]]" in prompt:
        page = f"<html><body>proxy error; you sent Authorization: {auth}</body></html>"
        return web.Response(body=page.encode(), content_type="text/html")
    if "[[sim:echostream]]" in prompt and stream:
        chunk = orjson.dumps({"error": {"message": f"upstream refused {auth.lower()}"}})
        return web.Response(body=b"data: " + chunk + b"\n\n", content_type="text/event-stream")
    for marker, (status, kind, message) in _MARKED.items():
        if marker in prompt:
            return _error(status, kind, message.format(upper=auth.upper()))
    return None


def _error(
    status: int, kind: str, message: str, retry_after_s: float | None = None
) -> web.Response:
    headers = {}
    if retry_after_s is not None:
        headers["retry-after-ms"] = str(round(retry_after_s * 1000, 3))
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    payload = {"error": {"message": message, "type": kind, "code": status}}
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers
    )
