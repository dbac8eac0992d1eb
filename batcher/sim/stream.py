"""Streaming: a reply sent as chat-completion chunks, the way OpenAI-compatible servers do."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web


async def stream_reply(
    request: web.Request,
    body: dict[str, Any],
    reply: dict[str, Any],
    *,
    headers: dict[str, str] | None,
    fault: str | None,
    stall_s: float,
    on_break: Callable[[], None],
) -> tuple[web.StreamResponse, bool]:
    """Send ``reply`` as server-sent chunks; with ``fault`` (cut, silence) the stream breaks
    midway, ``on_break`` told first. Returns the response and whether it broke."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **(headers or {})})
    await response.prepare(request)
    base = {k: reply[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}

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
                on_break()
                if fault == "silence":
                    await asyncio.sleep(stall_s)
                if request.transport is not None:
                    request.transport.close()
                return response, True
            await send({"choices": [{"index": index, "delta": {"content": piece}}]})
        await send(
            {"choices": [{"index": index, "delta": {}, "finish_reason": choice["finish_reason"]}]}
        )
    if (body.get("stream_options") or {}).get("include_usage"):
        await send({"choices": [], "usage": reply["usage"]})
    await send("[DONE]")
    await response.write_eof()
    return response, False
