"""A loopback server that answers chat completions the way a test says: replies of the wrong
shape, bodies that never end, gzip bombs, streams that misbehave. It runs on its own event
loop in a thread, like the simulator, and knows nothing of batcher."""

from __future__ import annotations

import asyncio
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any

import orjson
from aiohttp import web

from batcher.sim.hosting import AppThread

# Handler(prompt, attempt number of that prompt, request) -> the response, sent or to send.
Handler = Callable[[str, int, web.Request], Awaitable[web.StreamResponse]]
PIECE = b"x" * 65536


class HostileServer(AppThread):
    """``handler`` answers every POST to /v1/chat/completions; ``attempts`` counts prompts."""

    def __init__(self, handler: Handler) -> None:
        super().__init__(self.application, name="hostile", shutdown_timeout_s=0.1)
        self.handler = handler
        self.attempts: Counter[str] = Counter()

    def application(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._answer)
        return app

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        prompt = str(body["messages"][-1]["content"])
        self.attempts[prompt] += 1
        try:
            return await self.handler(prompt, self.attempts[prompt], request)
        except (ConnectionError, asyncio.CancelledError):
            # The client hung up on a body it did not want: what these tests expect of it.
            return web.Response(status=499)


def completion(content: Any = "fine", **fields: Any) -> dict[str, Any]:
    """A valid chat completion, or one with ``fields`` replacing its top-level fields."""
    reply: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "claude-3-5-haiku-20241022",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
    reply.update(fields)
    return reply


def json_reply(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


async def endless(request: web.Request, *, encoding: str | None = None) -> web.StreamResponse:
    """A 200 whose body never ends (64 KiB at a time, as fast as the client reads)."""
    headers = {"Content-Type": "application/json"}
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    while True:
        await response.write(PIECE)


async def drip(request: web.Request, *, every_s: float = 0.05) -> web.StreamResponse:
    """A 200 whose body comes a byte at a time and never ends: no read ever times out."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    await response.write(b'{"choices": [')
    while True:
        await asyncio.sleep(every_s)
        await response.write(b" ")


@cache
def bomb(inflated_bytes: int) -> bytes:
    """A gzip body of ``inflated_bytes`` zeros (about a thousandth of that on the wire)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = bytes(1 << 20)
    parts = [packer.compress(zeros) for _ in range(inflated_bytes >> 20)]
    return b"".join([*parts, packer.flush()])


def gzip_bomb(inflated_bytes: int = 512 << 20) -> web.Response:
    return web.Response(
        body=bomb(inflated_bytes),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )


async def events(
    request: web.Request, chunks: list[Any], *, done: bool = True
) -> web.StreamResponse:
    """A stream of ``chunks`` as server-sent events (bytes are sent as they are)."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for chunk in chunks:
        line = chunk if isinstance(chunk, bytes) else b"data: " + orjson.dumps(chunk) + b"\n\n"
        await response.write(line)
    if done:
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response
