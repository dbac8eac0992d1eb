"""Rate-limit headers, OpenAI and Anthropic style, as the simulator and real servers send them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from batcher.flow.server_limits import parse_duration, read_server_limits


def test_openai_headers() -> None:
    headers = httpx.Headers(
        {
            "X-RateLimit-Limit-Requests": "900",
            "x-ratelimit-remaining-requests": "899",
            "x-ratelimit-reset-requests": "6m0s",
            "x-ratelimit-limit-tokens": "40000",
            "x-ratelimit-remaining-tokens": "39000",
            "x-ratelimit-reset-tokens": "20ms",
        }
    )
    limits = read_server_limits(headers)
    assert limits is not None
    assert limits.style == "openai"
    assert limits.per_minute("requests") == 900
    assert limits.budgets["requests"].remaining == 899
    assert limits.budgets["requests"].reset_s == 360
    assert limits.per_minute("tokens") == 40000
    assert limits.budgets["tokens"].reset_s == pytest.approx(0.02)
    assert limits.per_minute("input_tokens") is None


def test_anthropic_headers_with_input_and_output_budgets() -> None:
    reset = (datetime.now(UTC) + timedelta(seconds=30)).isoformat(timespec="seconds")
    headers = httpx.Headers(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": reset,
            "anthropic-ratelimit-input-tokens-limit": "40000",
            "anthropic-ratelimit-output-tokens-limit": "8000",
        }
    )
    limits = read_server_limits(headers)
    assert limits is not None
    assert limits.style == "anthropic"
    assert limits.per_minute("requests") == 50
    assert limits.budgets["requests"].remaining == 0
    assert 28 <= (limits.budgets["requests"].reset_s or 0) <= 30
    assert limits.per_minute("input_tokens") == 40000
    assert limits.per_minute("output_tokens") == 8000


def test_no_headers_or_nonsense_is_none() -> None:
    assert read_server_limits(httpx.Headers({"content-type": "application/json"})) is None
    junk = httpx.Headers({"x-ratelimit-limit-requests": "lots", "x-ratelimit-reset-requests": "?"})
    assert read_server_limits(junk) is None
    assert read_server_limits(httpx.Headers({"x-ratelimit-limit-requests": "0"})) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("1m30.5s", 90.5), ("20ms", 0.02), ("2", 2.0), ("1h", 3600.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "s1"])
def test_bad_durations(text: str) -> None:
    assert parse_duration(text) is None
