"""Rate-limit headers, OpenAI and Anthropic style, as the simulator and real servers send them."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.flow.server_limits import (
    MAX_PER_MINUTE,
    MAX_WAIT_S,
    MIN_PER_MINUTE,
    parse_duration,
    parse_retry_after,
    read_server_limits,
)


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


def test_no_headers_is_none_and_nonsense_is_ignored_with_a_warning() -> None:
    assert read_server_limits(httpx.Headers({"content-type": "application/json"})) is None
    assert read_server_limits(httpx.Headers({"x-ratelimit-reset-requests": "?"})) is None
    for junk in ("lots", "0", "0.000001", "-60", "nan", "inf", "1" * 100):
        limits = read_server_limits(httpx.Headers({"x-ratelimit-limit-requests": junk}))
        assert limits is not None
        assert limits.budgets == {}, junk
        assert limits.ignored == (
            "ignored the server's x-ratelimit-limit-requests header: "
            "not a limit of 1 a minute or more",
        )


def test_a_broken_remaining_count_is_ignored_and_huge_numbers_are_bounded() -> None:
    headers = {
        "x-ratelimit-limit-requests": "1e300",
        "x-ratelimit-remaining-requests": "-3",
        "x-ratelimit-limit-tokens": "60",
        "x-ratelimit-remaining-tokens": "1e300",
    }
    limits = read_server_limits(httpx.Headers(headers))
    assert limits is not None
    assert limits.budgets["requests"].per_minute == MAX_PER_MINUTE
    assert limits.budgets["requests"].remaining is None
    assert limits.budgets["tokens"].remaining == MAX_PER_MINUTE
    assert limits.ignored == (
        "ignored the server's x-ratelimit-remaining-requests header: not a count of 0 or more",
    )


@pytest.mark.parametrize(
    ("reset", "seconds"),
    [("inf", MAX_WAIT_S), ("1e9", MAX_WAIT_S), ("99999999h", MAX_WAIT_S), ("nan", None)],
)
def test_reset_headers_are_bounded(reset: str, seconds: float | None) -> None:
    openai = {"x-ratelimit-limit-requests": "60", "x-ratelimit-reset-requests": reset}
    anthropic = {
        "anthropic-ratelimit-requests-limit": "60",
        "anthropic-ratelimit-requests-reset": reset,
    }
    for headers in (openai, anthropic):
        limits = read_server_limits(httpx.Headers(headers))
        assert limits is not None
        assert limits.budgets["requests"].reset_s == seconds


def test_an_anthropic_reset_far_away_is_bounded() -> None:
    for when, seconds in (("9999-12-31T23:59:59Z", MAX_WAIT_S), ("1970-01-01T00:00:00Z", 0.0)):
        headers = {
            "anthropic-ratelimit-requests-limit": "60",
            "anthropic-ratelimit-requests-reset": when,
        }
        limits = read_server_limits(httpx.Headers(headers))
        assert limits is not None
        assert limits.budgets["requests"].reset_s == seconds


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("1m30.5s", 90.5), ("20ms", 0.02), ("2", 2.0), ("1h", 3600.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "s1"])
def test_bad_durations(text: str) -> None:
    assert parse_duration(text) is None


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "inf"}, MAX_WAIT_S),
        ({"Retry-After": "1e9"}, MAX_WAIT_S),
        ({"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}, MAX_WAIT_S),
        ({"Retry-After": "Thu, 01 Jan 1970 00:00:00 GMT"}, 0.0),  # a time passed: now
        ({"retry-after-ms": "1e12"}, MAX_WAIT_S),
        ({"retry-after-ms": "inf"}, MAX_WAIT_S),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "-5"}, None),  # not a delay: the backoff's own wait applies
        ({"Retry-After": "-inf"}, None),
        ({"Retry-After": "9" * 5000}, None),
        ({"retry-after-ms": "nan", "Retry-After": "2"}, 2.0),
        ({"retry-after-ms": "-1", "Retry-After": "2"}, 2.0),
    ],
)
def test_retry_after_is_bounded(headers: dict[str, str], seconds: float | None) -> None:
    assert parse_retry_after(httpx.Headers(headers)) == seconds


_READ = [
    "retry-after",
    "retry-after-ms",
    *(
        f"x-ratelimit-{part}-{b}"
        for part in ("limit", "remaining", "reset")
        for b in ("requests", "tokens")
    ),
    *(
        f"anthropic-ratelimit-{b}-{part}"
        for part in ("limit", "remaining", "reset")
        for b in ("requests", "tokens", "input-tokens", "output-tokens")
    ),
]
_ASCII = st.characters(min_codepoint=32, max_codepoint=126)
_VALUES = st.one_of(
    st.sampled_from(["inf", "-inf", "nan", "1e9", "1e300", "-1e300", "-5", "0", "1e-300", "1_0"]),
    st.floats().map(repr),
    st.integers().map(str),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: email.utils.format_datetime(d, usegmt=True)),
    st.datetimes(timezones=st.sampled_from([UTC, None])).map(datetime.isoformat),
    st.lists(
        st.tuples(st.integers(0, 10**400).map(str), st.sampled_from(["ms", "s", "m", "h"])),
        min_size=1,
    ).map(lambda parts: "".join(n + u for n, u in parts)),
    st.text(_ASCII, max_size=80),
)


@given(st.dictionaries(st.sampled_from(_READ), _VALUES))
def test_every_header_number_is_read_bounded(fields: dict[str, str]) -> None:
    headers = httpx.Headers(fields)
    wait = parse_retry_after(headers)
    assert wait is None or 0 <= wait <= MAX_WAIT_S
    limits = read_server_limits(headers)
    for stated in limits.budgets.values() if limits is not None else ():
        assert MIN_PER_MINUTE <= stated.per_minute <= MAX_PER_MINUTE
        assert stated.remaining is None or 0 <= stated.remaining <= MAX_PER_MINUTE
        assert stated.reset_s is None or 0 <= stated.reset_s <= MAX_WAIT_S
