"""Whole runs against a hostile server on a loopback socket: replies of the wrong shape,
bodies that never end, gzip bombs, streams with absurd indexes. Good answers are kept, bad
ones fail their rows as data, and each attempt ends within its deadline in bounded memory."""

from __future__ import annotations

import resource
import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest
from aiohttp import web

from batcher.cli import main
from batcher.config import EndpointConfig
from batcher.send.attempt import AttemptError
from batcher.send.checks import SchemaChecks
from batcher.send.client import ChatClient
from tests import hostile
from tests.conftest import reviews, write_job

MiB = 1 << 20
# What each malformed row gets, by the row's number modulo len(MALFORMED) (its reply is a
# valid completion with these top-level fields, or these in its choice's message).
MALFORMED: list[dict[str, Any]] = [
    {"message": {"role": "assistant", "content": {"text": "an object"}}},
    {"message": {"role": "assistant", "content": "ok", "reasoning_content": {"x": 1}}},
    {"message": "hi"},
    {"finish_reason": {"why": "stop"}},
]


def row_number(prompt: str) -> int:
    return int(prompt.split(":", maxsplit=1)[0].removeprefix("Review k"))


async def mixed(prompt: str, attempt: int, _request: web.Request) -> web.StreamResponse:
    """Rows 0-9 good; 10-19 malformed every time; 20-29 malformed once, then good; a few
    replies with absurd usage or ids."""
    number = row_number(prompt)
    if number < 10 or (20 <= number < 30 and attempt > 1):
        return hostile.json_reply(hostile.completion(f"answer {number}"))
    if number in (30, 31):
        usage = {"prompt_tokens": 1e20 if number == 30 else -5, "completion_tokens": 1}
        return hostile.json_reply(hostile.completion("x", usage=usage))
    if number == 32:
        return hostile.json_reply(hostile.completion("x", id={"not": "a string"}, model={}))
    reply = hostile.completion()
    reply["choices"][0].update(MALFORMED[number % len(MALFORMED)])
    return hostile.json_reply(reply)


def test_good_answers_are_kept_and_malformed_replies_fail_their_rows(tmp_path: Path) -> None:
    data = reviews(33)
    with hostile.HostileServer(mixed) as server:
        job = write_job(
            tmp_path,
            server.url,
            data=data,
            limits={"concurrency": 4},
            retry={"max_attempts": 2, "initial_backoff_s": 0.001, "max_backoff_s": 0.01},
            output={"checkpoint_dir": "ck"},
        )
        assert main(["run", str(job), "--quiet"]) == 1
        out = pl.read_parquet(tmp_path / "out/result.parquet").sort("id")
        # A rerun sends the failed rows again and still builds the output (a reasoning
        # object once made it unbuildable on every run).
        assert main(["run", str(job), "--quiet"]) == 1
        assert pl.read_parquet(tmp_path / "out/result.parquet").height == 33
    assert out.height == 33
    good = out.filter(pl.col("error").is_null())
    answered = [f"k{i:05d}" for i in [*range(10), *range(20, 30)]]
    assert good["id"].to_list() == answered
    assert good["response"].to_list() == [f"answer {i}" for i in [*range(10), *range(20, 30)]]
    bad = out.filter(pl.col("error").is_not_null())
    assert bad.height == 13
    assert all(error.startswith("bad_reply: ") for error in bad["error"].to_list())
    assert bad["attempts"].unique().to_list() == [2]
    with sqlite3.connect(next((tmp_path / "ck").rglob("*.sqlite"))) as journal:
        kept = journal.execute("SELECT count(*) FROM outcomes WHERE ok = 1").fetchone()[0]
    assert kept == 20


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def bomb_reply(_prompt: str, _attempt: int, _request: web.Request) -> web.StreamResponse:
    return hostile.gzip_bomb(512 * MiB)


async def endless_reply(_prompt: str, _attempt: int, request: web.Request) -> web.StreamResponse:
    return await hostile.endless(request)


async def drip_reply(_prompt: str, _attempt: int, request: web.Request) -> web.StreamResponse:
    return await hostile.drip(request)


async def tool_index_stream(
    _prompt: str, _attempt: int, request: web.Request
) -> web.StreamResponse:
    call = {"index": 4_000_000, "id": "c", "function": {"name": "f", "arguments": "{}"}}
    return await hostile.events(
        request,
        [
            {"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        ],
    )


HOSTILE = {
    "gzip bomb": (bomb_reply, False, "reply_too_large"),
    "endless body": (endless_reply, False, "reply_too_large"),
    "slow drip": (drip_reply, False, "timeout"),
    "tool call 4,000,000": (tool_index_stream, True, "bad_reply"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_body_ends_its_attempt_in_time_and_bounded_memory(case: str) -> None:
    handler, stream, kind = HOSTILE[case]
    hostile.bomb(512 * MiB)  # made before measuring: it is the server's memory, not ours

    async def attempt(url: str) -> AttemptError:
        endpoint = EndpointConfig(base_url=url, timeout_s=2)  # the aiohttp transport
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        async with ChatClient(endpoint, None, 1) as client:
            try:
                with anyio.fail_after(endpoint.timeout_s):  # as Sender.send bounds an attempt
                    await client.complete(body)
            except TimeoutError:
                return AttemptError("timeout", "no reply in 2 s", retryable=True)
            except AttemptError as error:
                return error
        raise AssertionError("the hostile reply was taken as an answer")

    with hostile.HostileServer(handler) as server:
        before = rss_mb()
        error = anyio.run(attempt, server.url)
        grown = rss_mb() - before
    assert error.kind == kind
    assert grown < 200  # main: 1.5 GB for a 256 MiB bomb, 3.2 GB for the tool call index


def test_a_backtracking_pattern_neither_blocks_the_loop_nor_runs_on() -> None:
    """`^(a+)+$` against 40 "a" and a "b" would backtrack for days, holding the GIL."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a+)+$"}}}
    checks = SchemaChecks(schema, check_time_s=2)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    async def check() -> list[Any]:
        results: list[Any] = []
        async with anyio.create_task_group() as group:
            group.start_soon(tick)
            results.append(await checks.check('{"a": "aaaa"}'))
            start = ticks
            results.append(await checks.check('{"a": "' + "a" * 40 + 'b"}'))
            results.append(ticks - start)
            results.append(await checks.check('{"a": "aab"}'))
            group.cancel_scope.cancel()
        return results

    fine, stuck, ticked, mismatch = anyio.run(check)
    assert fine == ({"a": "aaaa"}, None)
    assert stuck == (None, "the schema check took over 2 s")
    assert ticked > 20  # the loop went on (2 s at 10 ms a tick; blocked, it ticks once)
    assert mismatch == (None, "a: 'aab' does not match '^(a+)+$'")  # a new worker took over


NOT_HTTP = {
    "8 KB header": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n{}",
    "bad status line": b"HTTP/1.1 abc\r\n\r\n",
    "not HTTP": b"\x00\x01\x02 hello\r\n\r\n",
    "broken chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
}


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize("case", NOT_HTTP)
def test_a_reply_that_is_not_http_fails_its_attempt(transport: str, case: str) -> None:
    """httpx-aiohttp let these through as aiohttp's ClientResponseError: a traceback."""
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def answer_once() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(NOT_HTTP[case])

        server = threading.Thread(target=answer_once, daemon=True)
        server.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"

        async def attempt() -> None:
            endpoint = EndpointConfig.model_validate(
                {"base_url": url, "timeout_s": 5, "transport": transport}
            )
            async with ChatClient(endpoint, None, 1) as client:
                await client.complete({"model": "m", "messages": []})

        with pytest.raises(AttemptError) as caught:
            anyio.run(attempt)
        server.join(timeout=5)
    assert (caught.value.kind, caught.value.retryable) == ("connection", True)
