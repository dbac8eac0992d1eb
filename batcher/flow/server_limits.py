"""What a server says about its rate limits in reply headers, OpenAI or Anthropic style.

OpenAI: ``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests``,
``x-ratelimit-reset-requests`` (a duration such as ``1s``, ``6m0s``, ``20ms``) and the same
for ``-tokens``. Anthropic: ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}
-{limit,remaining,reset}`` (reset an RFC 3339 time). Both state limits per minute.
"""

from __future__ import annotations

import email.utils
import re
import time
from dataclasses import dataclass
from datetime import datetime

import httpx

# The budgets a limit can bound; a request's cost is counted in each.
BUDGETS = ("requests", "tokens", "input_tokens", "output_tokens")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PREFIXES = (b"x-ratelimit-", b"anthropic-ratelimit-")


@dataclass(frozen=True, slots=True)
class StatedLimit:
    """One advertised limit: per minute, what is left of it and when it is whole again."""

    per_minute: float
    remaining: float | None = None
    reset_s: float | None = None


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """The limits one reply advertised, by budget name (``requests``, ``tokens``...)."""

    budgets: dict[str, StatedLimit]
    style: str  # "openai" or "anthropic"

    def per_minute(self, budget: str) -> float | None:
        found = self.budgets.get(budget)
        return found.per_minute if found is not None else None


def read_server_limits(headers: httpx.Headers, now: float | None = None) -> ServerLimits | None:
    """The rate limits in ``headers``, or None when the server sent none.

    One pass over the raw header list: most servers send none, and this runs for every reply.
    """
    fields: dict[str, str] = {}
    for name, value in headers.raw:
        lowered = name.lower()
        if lowered.startswith(_PREFIXES):
            fields[lowered.decode("latin-1")] = value.decode("latin-1")
    if not fields:
        return None
    budgets: dict[str, StatedLimit] = {}
    style = "openai"
    for budget in BUDGETS:
        dashed = budget.replace("_", "-")
        anthropic = f"anthropic-ratelimit-{dashed}-"
        if anthropic + "limit" in fields:
            style = "anthropic"
            found = _budget(
                fields.get(anthropic + "limit"),
                fields.get(anthropic + "remaining"),
                _seconds_until(fields.get(anthropic + "reset"), now),
            )
        else:
            openai = f"x-ratelimit-{{}}-{dashed}"
            found = _budget(
                fields.get(openai.format("limit")),
                fields.get(openai.format("remaining")),
                parse_duration(fields.get(openai.format("reset"))),
            )
        if found is not None:
            budgets[budget] = found
    return ServerLimits(budgets, style) if budgets else None


def _budget(limit: str | None, remaining: str | None, reset_s: float | None) -> StatedLimit | None:
    per_minute = _number(limit)
    if per_minute is None or per_minute <= 0:
        return None
    return StatedLimit(per_minute, _number(remaining), reset_s)


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def parse_duration(text: str | None) -> float | None:
    """OpenAI's reset durations (``1s``, ``6m0s``, ``1m30.5s``, ``20ms``); bare: seconds."""
    if not text:
        return None
    text = text.strip()
    bare = _number(text)
    if bare is not None:
        return max(bare, 0.0)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _seconds_until(text: str | None, now: float | None) -> float | None:
    """Seconds from now until an RFC 3339 time (Anthropic's ``-reset``)."""
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return parse_duration(text)
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def parse_retry_after(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(float(milliseconds) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)
