"""The reply boundary, unit by unit: a 200 of any shape through ``ChatClient`` (behind
``httpx.MockTransport``) is a typed, bounded Reply or an AttemptError, never anything else."""

from __future__ import annotations

import copy
import json
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher.config import EndpointConfig, JobConfig
from batcher.rows.request import RowRequest
from batcher.send.attempt import AttemptError
from batcher.send.client import ChatClient
from batcher.send.outcome import OutcomeBuilder
from batcher.send.prices import PriceTable
from batcher.send.reply import MAX_NAME, MAX_TOKENS, Reply
from batcher.send.tally import Tally
from tests.conftest import merge
from tests.fakes import completion

BASE_URL = "http://gateway.test/v1"
BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
MiB = 1 << 20


def endpoint(**fields: Any) -> EndpointConfig:
    return EndpointConfig(base_url=BASE_URL, transport="httpx", **fields)


class Chunks(httpx.AsyncByteStream):
    """A body that arrives as it would from a socket: in pieces, possibly forever."""

    def __init__(self, pieces: Callable[[], AsyncIterator[bytes]]) -> None:
        self.pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for piece in self.pieces():
            yield piece


async def complete(
    response: Callable[[], httpx.Response], body: dict[str, Any] = BODY, **fields: Any
) -> Reply:
    transport = httpx.MockTransport(lambda _request: response())
    async with ChatClient(endpoint(**fields), None, 1, transport=transport) as client:
        return await client.complete(body)


def dumps(data: Any) -> bytes:
    """JSON as a server may write it (integers of any size, unlike orjson)."""
    return json.dumps(data).encode()


def answer(data: Any) -> Callable[[], httpx.Response]:
    return lambda: httpx.Response(200, content=dumps(data))


def attempt_error(
    response: Callable[[], httpx.Response], body: dict[str, Any] = BODY, **fields: Any
) -> AttemptError:
    with pytest.raises(AttemptError) as caught:
        anyio.run(lambda: complete(response, body, **fields))
    return caught.value


def with_value(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A valid completion with the value at ``path`` replaced."""
    data = completion()
    data["usage"]["prompt_tokens_details"] = {"cached_tokens": 2}
    target: Any = data
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return data


WRONG = [
    (("choices", 0, "message", "content"), {"text": "hi"}),
    (("id",), {"x": 1}),
    (("choices", 0, "finish_reason"), ["stop"]),
    (("choices", 0, "message", "reasoning_content"), {"steps": []}),
    (("choices", 0, "message"), "hi"),
    (("model",), {}),
    (("choices", 0, "index"), "zero"),
    (("choices", 0, "index"), 10**6),
    (("usage", "prompt_tokens"), 1e20),
    (("usage", "prompt_tokens"), -5),
    (("usage", "completion_tokens"), True),
    (("usage", "completion_tokens"), 5.5),
    (("usage", "total_tokens"), "15"),
    (("usage", "prompt_tokens_details", "cached_tokens"), -1),
    (("usage", "cost"), -0.5),
    (("choices", 0, "message", "tool_calls"), [{"function": {"arguments": {"a": 1}}}]),
    (("choices", 0, "message", "tool_calls"), [{"id": "c"}] * 2000),
    (("choices",), [completion()["choices"][0]] * 200),
    (("model",), "m" * (MAX_NAME + 1)),
]


@pytest.mark.parametrize(("path", "value"), WRONG, ids=[".".join(map(str, p)) for p, _ in WRONG])
def test_a_reply_of_the_wrong_shape_fails_its_attempt_as_bad_reply(
    path: tuple[Any, ...], value: Any
) -> None:
    error = attempt_error(answer(with_value(path, value)))
    assert (error.kind, error.retryable) == ("bad_reply", True)
    assert "\n" not in error.message
    assert ".".join(map(str, path[:2])) in error.message


def test_a_valid_reply_keeps_what_the_output_reads() -> None:
    data = with_value(("usage", "completion_tokens"), 5)
    message = data["choices"][0]["message"]
    message["reasoning_content"] = "because"
    message["tool_calls"] = [{"id": "c1", "type": "function", "function": {"name": "f"}}]
    data["choices"][0]["logprobs"] = {"anything": [1, {"at": "all"}]}  # unread, dropped
    reply = anyio.run(lambda: complete(answer(data)))
    assert (reply.model, reply.response_id) == ("m", "resp-1")
    assert (reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens) == (10, 5, 2)
    assert reply.first["message"]["reasoning_content"] == "because"
    assert reply.first["message"]["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
    ]
    assert "logprobs" not in reply.first


def test_usage_at_the_bound_is_kept_and_past_it_is_not() -> None:
    reply = anyio.run(lambda: complete(answer(with_value(("usage", "prompt_tokens"), MAX_TOKENS))))
    assert reply.prompt_tokens == MAX_TOKENS
    error = attempt_error(answer(with_value(("usage", "prompt_tokens"), MAX_TOKENS + 1)))
    assert error.kind == "bad_reply"


def sse(*chunks: Any, done: bool = True) -> Callable[[], httpx.Response]:
    lines = [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks]
    content = b"".join(lines) + (b"data: [DONE]\n\n" if done else b"")
    return lambda: httpx.Response(
        200, content=content, headers={"content-type": "text/event-stream"}
    )


STREAM = {**BODY, "stream": True}


def test_a_stream_is_assembled_from_its_chunks() -> None:
    call = {"index": 0, "id": "c1", "function": {"name": "label", "arguments": '{"a"'}}
    response = sse(
        {"id": "s1", "model": "m", "choices": [{"index": 0, "delta": {"content": "he"}}]},
        {"choices": [{"index": 0, "delta": {"content": "llo", "tool_calls": [call]}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}},
    )
    reply = anyio.run(lambda: complete(response, STREAM))
    message = reply.first["message"]
    assert message["content"] == "hello"
    assert message["tool_calls"][0]["function"] == {"name": "label", "arguments": '{"a": 1}'}
    assert (reply.response_id, reply.prompt_tokens, reply.completion_tokens) == ("s1", 7, 3)
    assert reply.first["finish_reason"] == "tool_calls"


BAD_CHUNKS = [
    {"choices": [{"index": "zero", "delta": {"content": "x"}}]},
    {"choices": [{"index": 0, "delta": "str"}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 4_000_000, "id": "c"}]}}]},
    {"choices": [{"index": 0, "delta": {"content": {"text": "x"}}}]},
    {"choices": [{"index": 0, "delta": {}}], "usage": {"prompt_tokens": -1}},
]


@pytest.mark.parametrize("chunk", BAD_CHUNKS)
def test_a_stream_chunk_of_the_wrong_shape_fails_its_attempt_in_little_memory(
    chunk: dict[str, Any],
) -> None:
    tracemalloc.start()
    try:
        error = attempt_error(sse(chunk), STREAM)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (error.kind, error.retryable) == ("bad_reply", True)
    assert peak < 20 * MiB  # a tool call at index 4,000,000 held 3.2 GB


def streamed(
    pieces: Callable[[], AsyncIterator[bytes]], **headers: str
) -> Callable[[], httpx.Response]:
    return lambda: httpx.Response(200, headers=headers, stream=Chunks(pieces))


async def forever(piece: bytes) -> AsyncIterator[bytes]:
    while True:
        yield piece
        await anyio.lowlevel.checkpoint()


def bomb(inflated: int, wbits: int = zlib.MAX_WBITS | 16) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return b"".join([packer.compress(bytes(MiB)) for _ in range(inflated // MiB)]) + packer.flush()


def in_pieces(data: bytes, size: int = 16 * 1024) -> Callable[[], AsyncIterator[bytes]]:
    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(data), size):
            yield data[start : start + size]

    return pieces


def peak_of(
    response: Callable[[], httpx.Response], body: dict[str, Any] = BODY, **fields: Any
) -> tuple[AttemptError, int]:
    tracemalloc.start()
    try:
        error = attempt_error(response, body, **fields)
        return error, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_an_endless_body_stops_at_max_response_bytes(stream: bool) -> None:
    headers = {"content-type": "text/event-stream"} if stream else {}
    piece = b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n' * 1000
    # 1 MiB: a stream is parsed event by event (16,000 of them here) under tracemalloc, about
    # a second a MiB; its peak is about the cap, so the bound below is ten times the cap.
    error, peak = peak_of(
        streamed(lambda: forever(piece), **headers),
        STREAM if stream else BODY,
        max_response_bytes=MiB,
    )
    assert (error.kind, error.retryable) == ("reply_too_large", False)
    assert "max_response_bytes=1048576" in error.message
    assert peak < 10 * MiB


def test_a_gzip_bomb_stops_at_the_cap_not_after_inflating() -> None:
    body = bomb(256 * MiB)  # 256 MiB of zeros in 250 KB: httpx inflated it all (1.5 GB)
    response = streamed(in_pieces(body), **{"content-encoding": "gzip"})
    error, peak = peak_of(response, max_response_bytes=4 * MiB)
    assert error.kind == "reply_too_large"
    assert peak < 40 * MiB


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS | 16, zlib.MAX_WBITS, -zlib.MAX_WBITS])
def test_compressed_replies_still_decode(wbits: int) -> None:
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    body = packer.compress(orjson.dumps(completion("zipped" * 50_000))) + packer.flush()
    encoding = "gzip" if wbits > zlib.MAX_WBITS else "deflate"
    response = streamed(in_pieces(body, 1000), **{"content-encoding": encoding})
    reply = anyio.run(lambda: complete(response))
    assert reply.first["message"]["content"] == "zipped" * 50_000


def test_a_body_that_does_not_inflate_fails_its_attempt() -> None:
    response = streamed(in_pieces(b"not gzip at all" * 100), **{"content-encoding": "gzip"})
    error = attempt_error(response)  # httpx's DecodingError escaped the attempt before
    assert (error.kind, error.retryable) == ("bad_reply", True)


def test_a_stream_line_that_never_ends_stops_at_the_line_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("batcher.send.client.MAX_LINE_BYTES", 64 * 1024)
    response = streamed(
        lambda: forever(b"data: " + b"x" * 4096), **{"content-type": "text/event-stream"}
    )
    error = attempt_error(response, STREAM, max_response_bytes=64 * MiB)
    assert (error.kind, error.message) == ("reply_too_large", "a stream line is over 65536 bytes")


def test_an_error_body_is_read_within_the_cap_too() -> None:
    error, peak = peak_of(
        lambda: httpx.Response(503, stream=Chunks(lambda: forever(b"e" * 65536))),
        max_response_bytes=2 * MiB,
    )
    assert error.kind == "reply_too_large"
    assert peak < 40 * MiB


# -- fuzz: anything a server may send is a Reply of sound values or an AttemptError ---------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from([-1, 0, 2**63, 10**20, 4_000_000, 1e20, "zero", "", "stop"])
)
JSON = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["choices", "message", "content", "index", "delta", "usage"])
            | st.text(max_size=8),
            children,
            max_size=4,
        )
    ),
    max_leaves=25,
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, child in items:
        found += paths(child, (*prefix, key))
    return found


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any]) -> dict[str, Any]:
    """``valid`` with a few of its fields replaced by any JSON value, or removed."""
    data = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        options = paths(data)
        if not options:
            break
        path = draw(st.sampled_from(options))
        target: Any = data
        for step in path[:-1]:
            target = target[step]
        if isinstance(target, dict) and draw(st.booleans()):
            del target[path[-1]]
        else:
            target[path[-1]] = draw(JSON)
    return data


RICH = with_value(
    ("choices", 0, "message", "tool_calls"),
    [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
)
CONFIG = JobConfig.model_validate(
    merge(
        {"name": "fuzz", "input": {"path": "d.csv", "id_column": "id"}},
        {"request": {"model": "m", "prompt": "{{ x }}"}, "endpoint": {"base_url": BASE_URL}},
    )
)


def assert_sound(reply: Reply) -> None:
    """What the journal and the output need of a reply: typed, bounded values."""
    for count in (
        reply.prompt_tokens,
        reply.completion_tokens,
        reply.total_tokens,
        reply.cached_tokens,
    ):
        assert count is None or (type(count) is int and 0 <= count <= MAX_TOKENS)
    for name in (reply.model, reply.response_id):
        assert name is None or (isinstance(name, str) and len(name) <= MAX_NAME)
    for choice in reply.choices:
        message = choice["message"]
        for field in ("content", "reasoning_content", "reasoning"):
            assert message.get(field) is None or isinstance(message[field], str)
        assert choice.get("finish_reason") is None or isinstance(choice["finish_reason"], str)
    # The row this reply makes can be built and encoded, as the journal will.
    builder = OutcomeBuilder(CONFIG, PriceTable.load(), Tally())
    outcome = builder.answered(RowRequest("k", BODY, b"f", 0), [reply], [], None, 1, 0.1)
    assert outcome.response is None or isinstance(outcome.response, str)
    orjson.dumps(outcome.extra)


def survives(response: Callable[[], httpx.Response], body: dict[str, Any]) -> None:
    """The attempt gives a sound Reply or an AttemptError; anything else escapes the test."""
    try:
        reply = anyio.run(lambda: complete(response, body))
    except AttemptError as caught:
        error = caught
    else:
        assert_sound(reply)
        return
    assert error.kind
    assert "\n" not in error.message


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.one_of(JSON, mutated(RICH)))
def test_any_json_reply_is_a_sound_reply_or_an_attempt_error(data: Any) -> None:
    survives(answer(data), BODY)


CHUNK = {
    "id": "s",
    "model": "m",
    "choices": [
        {
            "index": 0,
            "delta": {
                "content": "x",
                "tool_calls": [
                    {"index": 0, "id": "c", "function": {"name": "f", "arguments": "{"}}
                ],
            },
            "finish_reason": None,
        }
    ],
    "usage": {"prompt_tokens": 1},
}
LINES = st.one_of(
    st.builds(lambda c: b"data: " + dumps(c), st.one_of(JSON, mutated(CHUNK))),
    st.binary(max_size=30),
    st.sampled_from([b"data: [DONE]", b"", b": comment", b"event: x", b"data: {"]),
)


@FUZZ
@given(st.lists(LINES, max_size=12), st.booleans())
def test_any_stream_is_a_sound_reply_or_an_attempt_error(lines: list[bytes], done: bool) -> None:
    content = b"\n".join(lines) + (b"\ndata: [DONE]\n" if done else b"")
    response = lambda: httpx.Response(  # noqa: E731
        200, content=content, headers={"content-type": "text/event-stream"}
    )
    tracemalloc.start()
    try:
        survives(response, STREAM)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * MiB
