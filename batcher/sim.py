"""A local OpenAI-compatible chat-completions server for trying jobs offline and for tests.

Replies are derived from the request (same request, same reply), carry usage, honour ``n``,
``stop``, ``max_tokens``, ``tools`` and ``stream``, and can be made to misbehave: latency,
rate limits enforced with 429 + Retry-After, and a share of rows that fail their first
attempts with chosen fault kinds. Markers in a prompt force an answer for that row:
``[[sim:400]]``, ``[[sim:401]]``, ``[[sim:402]]``, ``[[sim:invalid]]`` (arguments that break
the tool's schema), ``[[sim:n1]]`` (one choice whatever ``n`` asks).

``GET /sim/stats`` reports what the server saw; ``POST /sim/reset`` clears it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import math
import random
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from batcher.images import sniff_mime

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
_OPTIONS = re.compile(r"one word:\s*([\w\- ,]+?)\s+or\s+([\w\-]+)", re.IGNORECASE)
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


@dataclass(slots=True)
class _Bucket:
    """A token bucket: ``rate`` per second, holding at most ``capacity``."""

    rate: float
    capacity: float
    level: float = 0.0
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, cost: float, now: float) -> float:
        """0 and take ``cost`` if it is there; else seconds until it would be."""
        self._refill(now)
        if self.level >= min(cost, self.capacity):
            self.level -= cost
            return 0.0
        return (min(cost, self.capacity) - self.level) / self.rate

    def give_back(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)


def count_tokens(text: str) -> int:
    """The simulator's tokenizer: deliberately not the client's four-characters estimate."""
    return math.ceil(len(text) / 3.6) if text else 0


def _digest(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


def _user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    return ""


class Simulator:
    """The server's state: settings, rate buckets, and what it saw."""

    def __init__(self, settings: SimSettings | None = None) -> None:
        self.settings = settings or SimSettings()
        self._random = random.Random(self.settings.seed)
        self.reset()

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
        self._request_bucket = (
            _Bucket(s.requests_per_minute / 60, max(1.0, s.requests_per_minute / 60 * s.burst_s))
            if s.requests_per_minute
            else None
        )
        self._token_bucket = (
            _Bucket(s.tokens_per_minute / 60, max(1.0, s.tokens_per_minute / 60 * s.burst_s))
            if s.tokens_per_minute
            else None
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
        }

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/chat/completions", self._handle)
        app.router.add_get("/sim/stats", self._stats)
        app.router.add_post("/sim/reset", self._reset)
        return app

    async def _stats(self, _: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats()), content_type="application/json")

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
        prompt = _user_text(messages)
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
        if s.latency_s or s.latency_jitter_s:
            await asyncio.sleep(s.latency_s + self._random.uniform(0, s.latency_jitter_s))
        fault = self._fault_for(raw, attempt)
        streaming_fault = fault in ("cut", "silence") and body.get("stream")
        if fault is not None and not streaming_fault:
            return await self._fault(request, "stall" if fault == "silence" else fault)
        prompt_tokens = self._count_prompt(messages)
        max_tokens = int(body.get("max_tokens") or 1024)
        limited = self._admit(prompt_tokens + max_tokens)
        if limited is not None:
            return limited
        reply = self._reply(body, prompt, prompt_tokens)
        completion = reply["usage"]["completion_tokens"]
        if self._token_bucket is not None:
            self._token_bucket.give_back(max(max_tokens - completion, 0), time.monotonic())
        if body.get("stream"):
            return await self._stream(request, body, reply, fault=fault)
        self._count_answer(prompt, reply)
        return web.Response(body=orjson.dumps(reply), content_type="application/json")

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
        h = _digest(canonical, s.seed)
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
            return _error(
                429, "rate_limit_error", "simulated rate limit", retry_after_s=s.retry_after_s
            )
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

    def _admit(self, tokens: int) -> web.Response | None:
        now = time.monotonic()
        waits = []
        if self._request_bucket is not None:
            waits.append(self._request_bucket.wait_for(1, now))
        if waits and waits[0] > 0:
            return self._limited(waits[0])
        if self._token_bucket is not None:
            wait = self._token_bucket.wait_for(tokens, now)
            if wait > 0:
                if self._request_bucket is not None:
                    self._request_bucket.give_back(1, now)
                return self._limited(wait)
        return None

    def _limited(self, wait_s: float) -> web.Response:
        self.statuses["429"] += 1
        return _error(429, "rate_limit_error", "rate limit exceeded", retry_after_s=wait_s)

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

    def _reply(self, body: dict[str, Any], prompt: str, prompt_tokens: int) -> dict[str, Any]:
        n = 1 if "[[sim:n1]]" in prompt else int(body.get("n") or 1)
        max_tokens = int(body.get("max_tokens") or 1024)
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        tools = body.get("tools") or []
        choices = []
        completion = 0
        h = _digest(orjson.dumps(body.get("messages")), body.get("model"))
        for index in range(n):
            message: dict[str, Any] = {"role": "assistant", "content": None}
            finish = "stop"
            if tools:
                tool = _chosen_tool(tools, body.get("tool_choice"))
                arguments = _arguments(tool["function"].get("parameters") or {}, h + index)
                if "[[sim:invalid]]" in prompt:
                    arguments = {"unexpected": True}
                text = orjson.dumps(arguments).decode()
                message["tool_calls"] = [
                    {
                        "id": f"call_{(h + index) % 10**12:012d}",
                        "type": "function",
                        "function": {"name": tool["function"]["name"], "arguments": text},
                    }
                ]
                finish = "tool_calls"
                completion += count_tokens(text)
            else:
                text = _content(prompt, h + index)
                for stop in stops:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                tokens = count_tokens(text)
                if tokens > max_tokens:
                    text = text[: int(max_tokens * 3.6)]
                    tokens = count_tokens(text)
                    finish = "length"
                message["content"] = text
                completion += tokens
            if body.get("reasoning_effort") not in (None, "none"):
                message["reasoning_content"] = f"Simulated {body['reasoning_effort']} reasoning."
            choices.append({"index": index, "message": message, "finish_reason": finish})
        return {
            "id": f"chatcmpl-sim{h % 10**10:010d}",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": body.get("model", "sim"),
            "choices": choices,
            "usage": self._usage(prompt_tokens, completion),
        }

    def _usage(self, prompt_tokens: int, completion: int) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        if self.settings.cached_share:
            cached = int(prompt_tokens * self.settings.cached_share)
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return usage

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        reply: dict[str, Any],
        *,
        fault: str | None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
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
        self._count_answer(_user_text(body["messages"]), reply)
        await response.write_eof()
        return response


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


def _content(prompt: str, h: int) -> str:
    options = _OPTIONS.search(prompt)
    if options:
        words = [w.strip() for w in options.group(1).split(",") if w.strip()] + [options.group(2)]
        return words[h % len(words)]
    if "json" in prompt.lower():
        words = prompt.split()
        return orjson.dumps(
            {"answer": words[h % len(words)] if words else "", "length": len(prompt)}
        ).decode()
    head = " ".join(prompt.split()[:8])
    return f"Simulated reply {h % 100_000:05d} to: {head}. The end."


def _chosen_tool(tools: list[dict[str, Any]], choice: Any) -> dict[str, Any]:
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        for tool in tools:
            if tool.get("function", {}).get("name") == name:
                return tool
    return tools[0]


def _arguments(schema: dict[str, Any], h: int) -> Any:
    """A value valid against a (simple) JSON Schema, chosen by ``h``."""
    if "enum" in schema:
        return schema["enum"][h % len(schema["enum"])]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object":
        properties = schema.get("properties") or {}
        return {
            name: _arguments(sub, h // (i + 2)) for i, (name, sub) in enumerate(properties.items())
        }
    if kind == "array":
        return [_arguments(schema.get("items") or {}, h)]
    if kind == "number":
        return round((h % 1000) / 1000, 3)
    if kind == "integer":
        return h % 100
    if kind == "boolean":
        return bool(h % 2)
    return f"text-{h % 1000}"


@asynccontextmanager
async def serve(
    settings: SimSettings | None = None, *, port: int = 0
) -> AsyncIterator[tuple[str, Simulator]]:
    """Run the simulator on 127.0.0.1 for the duration; yields its base URL and state."""
    simulator = Simulator(settings)
    runner = web.AppRunner(
        simulator.app(), handle_signals=False, access_log=None, shutdown_timeout=0.5
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    host, bound = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{bound}/v1", simulator
    finally:
        await runner.cleanup()


class SimulatorThread:
    """The simulator on its own event loop in a background thread (for tests and scripts)."""

    def __init__(self, settings: SimSettings | None = None, *, port: int = 0) -> None:
        self.settings = settings
        self.port = port
        self.url = ""
        self.simulator: Simulator | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name="batcher-sim", daemon=True)

    def __enter__(self) -> SimulatorThread:
        self._thread.start()
        self._ready.wait(timeout=30)
        return self

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self.settings, port=self.port) as (url, simulator):
            self.url, self.simulator = url, simulator
            self._ready.set()
            await self._stop.wait()
