"""Every number a server states in reply headers, read as a bounded value: when to come back
(``Retry-After``) and its rate limits, OpenAI or Anthropic style.

OpenAI: ``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests``,
``x-ratelimit-reset-requests`` (a duration such as ``1s``, ``6m0s``, ``20ms``) and the same
for ``-tokens``. Anthropic: ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}
-{limit,remaining,reset}`` (reset an RFC 3339 time). Both state limits per minute.
``Retry-After`` is seconds or an HTTP date; ``retry-after-ms`` milliseconds.

No header is trusted: a wait that is not a number (``nan``, garbage, a negative delay) is read
as absent, one past ``MAX_WAIT_S`` (``inf``, ``1e9``, the year 9999) as ``MAX_WAIT_S``; a
limit below ``MIN_PER_MINUTE`` or not finite is ignored, and named in ``ServerLimits.ignored``
so the run can say so, rather than become a pace that holds the run for ever.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime

import httpx

# The longest wait any header can ask for. It trades a server's real reset windows (a minute,
# a day's quota at most an hour away) against a wait with no end: a longer ask is taken as
# this long, and a run whose limits.stall_timeout_s is shorter stops as stalled instead.
MAX_WAIT_S = 3600.0
# A stated limit below one a minute is a broken header, not a pace: 0.000001 requests a
# minute would hold each request for two years.
MIN_PER_MINUTE = 1.0
# Above any real limit (tokens a minute included); larger numbers are read as this, so no
# rate or concurrency built from them overflows.
MAX_PER_MINUTE = 1e12
_MAX_TEXT = 64  # a header number longer than this is garbage, not read

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
    """The limits one reply advertised, by budget name (``requests``, ``tokens``...), and
    the headers it sent that were ignored (each a warning for the run to count)."""

    budgets: dict[str, StatedLimit]
    style: str  # "openai" or "anthropic"
    ignored: tuple[str, ...] = ()

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
    ignored: list[str] = []
    style = "openai"
    for budget in BUDGETS:
        dashed = budget.replace("_", "-")
        anthropic = f"anthropic-ratelimit-{dashed}-"
        if anthropic + "limit" in fields:
            style = "anthropic"
            names = (anthropic + "limit", anthropic + "remaining")
            reset_s = _seconds_until(fields.get(anthropic + "reset"), now)
        else:
            names = (f"x-ratelimit-limit-{dashed}", f"x-ratelimit-remaining-{dashed}")
            reset_s = parse_duration(fields.get(f"x-ratelimit-reset-{dashed}"))
        found = _budget(names, fields, reset_s, ignored)
        if found is not None:
            budgets[budget] = found
    return ServerLimits(budgets, style, tuple(ignored)) if budgets or ignored else None


def _budget(
    names: tuple[str, str], fields: dict[str, str], reset_s: float | None, ignored: list[str]
) -> StatedLimit | None:
    limit_name, remaining_name = names
    limit, remaining = fields.get(limit_name), fields.get(remaining_name)
    if limit is None:
        return None
    per_minute = _number(limit)
    if per_minute is None or not MIN_PER_MINUTE <= per_minute < math.inf:
        ignored.append(
            f"ignored the server's {limit_name} header: not a limit of 1 a minute or more"
        )
        return None
    left = _number(remaining)
    if remaining is not None and (left is None or not 0 <= left < math.inf):
        ignored.append(f"ignored the server's {remaining_name} header: not a count of 0 or more")
        left = None
    if left is not None:
        left = min(left, MAX_PER_MINUTE)
    return StatedLimit(min(per_minute, MAX_PER_MINUTE), left, reset_s)


def _number(text: str | None) -> float | None:
    """A header's number; None when absent, too long to be one, not one, or ``nan``."""
    if text is None or len(text) > _MAX_TEXT:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return None if math.isnan(number) else number


def _wait(seconds: float | None) -> float | None:
    """A wait a header asked for, within [0, MAX_WAIT_S]; a negative one is not a wait."""
    if seconds is None or not seconds >= 0:
        return None
    return min(seconds, MAX_WAIT_S)


def parse_duration(text: str | None) -> float | None:
    """OpenAI's reset durations (``1s``, ``6m0s``, ``1m30.5s``, ``20ms``); bare: seconds."""
    if not text or len(text) > _MAX_TEXT:
        return None
    text = text.strip()
    bare = _number(text)
    if bare is not None:
        return _wait(bare)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return _wait(sum(float(n) * _UNIT_S[u] for n, u in parts))


def _seconds_until(text: str | None, now: float | None) -> float | None:
    """Seconds from now until an RFC 3339 time (Anthropic's ``-reset``)."""
    if not text or len(text) > _MAX_TEXT:
        return None
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return parse_duration(text)
    if when.tzinfo is None:
        return None
    return _until(when, now)


def _until(when: datetime, now: float | None) -> float | None:
    """Seconds from ``now`` (default: the wall clock) until ``when``: 0 once it has passed."""
    try:
        stamp = when.timestamp()
    except (OverflowError, OSError, ValueError):
        return None
    return _wait(max(stamp - (time.time() if now is None else now), 0.0))


def parse_retry_after(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date),
    at most ``MAX_WAIT_S``; None when neither states a wait."""
    milliseconds = _number(headers.get("retry-after-ms"))
    if milliseconds is not None and milliseconds >= 0:
        return _wait(milliseconds / 1000)
    value = headers.get("retry-after")
    if not value or len(value) > _MAX_TEXT:
        return None
    seconds = _number(value)
    if seconds is not None:
        return _wait(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return _until(when, now)
