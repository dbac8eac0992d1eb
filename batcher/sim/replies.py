"""What the simulator answers: replies derived from the request alone, and its token counts."""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import orjson

from batcher.sim.schema import value_for, violation_for

_OPTIONS = re.compile(r"one word:\s*([\w\- ,]+?)\s+or\s+([\w\-]+)", re.IGNORECASE)


def count_tokens(text: str) -> int:
    """The simulator's tokenizer: deliberately not the client's four-characters estimate."""
    return math.ceil(len(text) / 3.6) if text else 0


def digest(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


def user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    return ""


def build_reply(
    body: dict[str, Any],
    prompt: str,
    prompt_tokens: int,
    cached_share: float = 0.0,
    *,
    violate: bool = False,
) -> dict[str, Any]:
    """The reply to a request: derived from it alone, so the same request gets the same reply.
    Structured output (tools, ``response_format``) meets the request's schema, unless
    ``violate`` or the prompt's ``[[sim:invalid]]`` asks for a value that breaks it."""
    n = 1 if "[[sim:n1]]" in prompt else int(body.get("n") or 1)
    max_tokens = int(body.get("max_tokens") or 1024)
    stops = body.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    tools = body.get("tools") or []
    choices = []
    completion = 0
    h = digest(orjson.dumps(body.get("messages")), body.get("model"))
    for index in range(n):
        message: dict[str, Any] = {"role": "assistant", "content": None}
        finish = "stop"
        if tools:
            tool = _chosen_tool(tools, body.get("tool_choice"))
            parameters = tool["function"].get("parameters") or {}
            make = violation_for if violate else value_for
            arguments = make(parameters, h + index)
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
            text = _content(prompt, h + index, body.get("response_format"), violate)
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
        "usage": usage(prompt_tokens, completion, cached_share),
    }


def usage(prompt_tokens: int, completion: int, cached_share: float = 0.0) -> dict[str, Any]:
    """The usage object of a reply; ``cached_share`` of the prompt reported as cached."""
    counts: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
    if cached_share:
        cached = int(prompt_tokens * cached_share)
        counts["prompt_tokens_details"] = {"cached_tokens": cached}
    return counts


def structured_schema(response_format: Any) -> dict[str, Any] | None:
    """The schema a ``response_format`` of type ``json_schema`` asks the reply to meet (as
    OpenAI nests it, ``{"json_schema": {"schema": ...}}``, or flat); None for any other."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else response_format.get("schema")
    return schema if isinstance(schema, dict) else {}


def _content(prompt: str, h: int, response_format: Any = None, violate: bool = False) -> str:
    schema = structured_schema(response_format)
    if schema is not None:
        wrong = violate or "[[sim:invalid]]" in prompt
        return orjson.dumps(violation_for(schema, h) if wrong else value_for(schema, h)).decode()
    json_object = isinstance(response_format, dict) and response_format.get("type") == "json_object"
    options = _OPTIONS.search(prompt)
    if options and not json_object:
        words = [w.strip() for w in options.group(1).split(",") if w.strip()] + [options.group(2)]
        return words[h % len(words)]
    if json_object or "json" in prompt.lower():
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
