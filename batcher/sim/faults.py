"""Faults the simulator injects: which attempt of which request meets one, and its reply."""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from batcher.sim.replies import digest

if TYPE_CHECKING:
    from batcher.sim.server import SimSettings

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


def fault_for(s: SimSettings, raw: bytes, attempt: int) -> str | None:
    """The fault this attempt of this request meets, if any."""
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


def violates_schema(s: SimSettings, messages: object, attempt: int) -> bool:
    """Whether this attempt's structured reply breaks the request's schema: each attempt
    drawn apart (``schema_violation_share`` of them), so a retry may cure it as with a model."""
    if s.schema_violation_share <= 0:
        return False
    h = digest(orjson.dumps(messages), s.seed, attempt, "schema")
    return (h % 10_000) / 10_000 < s.schema_violation_share


async def inject(request: web.Request, fault: str, s: SimSettings) -> web.StreamResponse:
    """The reply of a fault other than 429: an error status, a stall, a broken body, a drop."""
    if fault.isdigit():
        retry_after = s.retry_after_s if fault == "503" else None
        return error_response(
            int(fault), "api_error", f"simulated {fault}", retry_after_s=retry_after
        )
    if fault == "stall":
        await asyncio.sleep(s.stall_s)
        return error_response(504, "api_error", "stalled")
    if fault == "malformed":
        return web.Response(
            body=b'{"id": "broken", "choices": [{"mess', content_type="application/json"
        )
    if fault == "nochoices":
        return web.Response(body=b'{"id": "empty", "choices": []}', content_type="application/json")
    # drop (and cut for a non-streaming request): close the socket without a reply.
    if request.transport is not None:
        request.transport.close()
    raise asyncio.CancelledError


def error_parts(
    status: int,
    kind: str,
    message: str,
    retry_after_s: float | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """An error reply's JSON body and headers (Retry-After in seconds and milliseconds)."""
    headers = dict(headers or {})
    if retry_after_s is not None:
        headers["retry-after-ms"] = str(round(retry_after_s * 1000, 3))
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    payload = {"error": {"message": message, "type": kind, "code": status}}
    return orjson.dumps(payload), headers


def error_response(
    status: int,
    kind: str,
    message: str,
    retry_after_s: float | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body, headers = error_parts(status, kind, message, retry_after_s, headers)
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)
