"""A row's life, unit by unit: replies from ``httpx.MockTransport``, a clock that moves only
when something sleeps, and sleeps that record their waits instead of waiting."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from batcher.config import JobConfig
from batcher.errors import (
    BudgetReachedError,
    InterruptedRunError,
    KeyRefusedError,
    RateLimitStallError,
)
from batcher.flow.controller import FlowController, Halted
from batcher.rows.images import ImageLoader
from batcher.rows.request import RequestBuilder
from batcher.runs.stopping import Stopping
from batcher.send.budget import BudgetStop
from batcher.send.client import ChatClient
from batcher.send.parse import OutputParser
from batcher.send.prices import PriceTable
from batcher.send.sender import Sender
from batcher.send.tally import Tally
from batcher.send.worker import RowWorker
from batcher.store.columns import Outcome
from tests.conftest import merge
from tests.fakes import FakeTime, Script, answer, refusal

pytestmark = pytest.mark.anyio
BASE_URL = "http://gateway.test/v1"
MODEL = "claude-3-5-haiku-20241022"


def job_config(**sections: Any) -> JobConfig:
    job: dict[str, Any] = {
        "name": "unit",
        "input": {"path": "data.csv", "id_column": "id"},
        "endpoint": {"base_url": BASE_URL, "transport": "httpx"},
        "request": {"model": MODEL, "prompt": "Say {{ text }}", "max_tokens": 32},
        "limits": {"concurrency": 4},
        "retry": {"initial_backoff_s": 1, "max_backoff_s": 4},
    }
    return JobConfig.model_validate(merge(job, sections))


async def process(script: Script, time: FakeTime, tally: Tally, **sections: Any) -> Outcome:
    """One row, ``{"text": "hi"}``, through every part of a row's life."""
    config = job_config(**sections)
    builder = RequestBuilder(config.request, BASE_URL)
    transport = httpx.MockTransport(script)
    flow = FlowController(config.limits, clock=time.clock, sleep=time.pace_sleep)
    images = ImageLoader(Path("."), config.images)
    async with ChatClient(config.endpoint, None, 4, transport=transport) as client:
        sender = Sender.for_job(config, builder, client, flow, images, tally, clock=time.clock)
        worker = RowWorker.for_job(
            config,
            builder,
            sender,
            OutputParser(config),
            PriceTable.load(),
            tally,
            sleep=time.retry_sleep,
            clock=time.clock,
        )
        return await worker.process(builder.build("k1", {"text": "hi"}))


async def test_answered_at_once_waits_for_nothing() -> None:
    time, tally = FakeTime(), Tally()
    outcome = await process(Script.of(answer("hello")), time, tally)
    assert (outcome.ok, outcome.response, outcome.attempts) == (True, "hello", 1)
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (10, 5)
    assert outcome.cost_usd == pytest.approx((10 * 0.8 + 5 * 4) / 1_000_000)
    assert tally.cost_usd == outcome.cost_usd
    assert (tally.requests, tally.retries) == (1, 0)
    assert time.retry_waits == []
    assert time.pace_waits == []


async def test_a_server_error_is_retried_after_a_backoff() -> None:
    time, tally = FakeTime(), Tally()
    outcome = await process(Script.of(refusal(503), answer()), time, tally)
    assert (outcome.ok, outcome.attempts) == (True, 2)
    assert (tally.requests, tally.retries, tally.errors["http_503"]) == (2, 1, 1)
    (wait,) = time.retry_waits
    assert 0 <= wait <= 1  # full jitter under initial_backoff_s


async def test_429s_wait_their_retry_after_and_do_not_use_up_attempts() -> None:
    time, tally = FakeTime(), Tally()
    script = Script.of([refusal(429, retry_after_s=2)] * 3, answer())
    outcome = await process(script, time, tally, retry={"max_attempts": 2})
    assert (outcome.ok, outcome.attempts, outcome.error) == (True, 4, None)
    assert tally.rate_limited == 3
    assert len(time.retry_waits) == 3
    # Exactly the server's Retry-After, plus at most a tenth so refused requests spread out.
    assert all(2.0 <= wait <= 2.2 for wait in time.retry_waits)


async def test_max_attempts_counts_failures_other_than_429() -> None:
    time, tally = FakeTime(), Tally()
    outcome = await process(Script.of(refusal(500)), time, tally, retry={"max_attempts": 3})
    assert (outcome.ok, outcome.error_kind, outcome.attempts) == (False, "http_500", 3)
    assert outcome.error == "http_500: status 500"
    assert len(time.retry_waits) == 2


async def test_invalid_output_has_its_own_count_and_keeps_the_raw_reply() -> None:
    time, tally = FakeTime(), Tally()
    json_output = {"parse": "json", "schema": {"type": "object", "properties": {}}}
    script = Script.of(answer("not json"))
    outcome = await process(
        script,
        time,
        tally,
        output=json_output,
        retry={"max_attempts": 1, "invalid_output_attempts": 2},
    )
    # max_attempts=1 does not cut it short: three replies, each paid for, none parsed.
    assert (outcome.ok, outcome.error_kind, outcome.attempts) == (False, "invalid_output", 3)
    assert outcome.response == "not json"
    assert outcome.prompt_tokens == 30
    assert len(script.sent) == 3


async def test_a_reply_that_parses_after_invalid_ones_is_answered() -> None:
    time, tally = FakeTime(), Tally()
    json_output = {"parse": "json", "schema": {"type": "object", "properties": {}}}
    script = Script.of(answer("nope"), answer("{}"))
    outcome = await process(script, time, tally, output=json_output)
    assert (outcome.ok, outcome.attempts) == (True, 2)
    assert outcome.prompt_tokens == 20  # the wasted reply is paid for too
    assert outcome.extra == {"parsed": {}}


async def test_the_deadline_ends_a_row_retried_too_long() -> None:
    time, tally = FakeTime(), Tally()
    outcome = await process(
        Script.of(refusal(503)),
        time,
        tally,
        retry={"max_attempts": 100, "deadline_s": 5, "initial_backoff_s": 4},
    )
    assert (outcome.ok, outcome.error_kind) == (False, "deadline")
    assert "retry.deadline_s=5" in (outcome.error or "")
    assert sum(time.retry_waits) >= 5 - sum(time.pace_waits)


async def test_fan_out_sends_one_request_per_choice() -> None:
    time, tally = FakeTime(), Tally()
    script = Script.of(answer("a"), refusal(500), answer("b"), answer("c"))
    outcome = await process(script, time, tally, request={"n": 3, "n_mode": "fanout"})
    assert outcome.ok
    assert outcome.attempts == 4
    assert outcome.extra is not None
    assert outcome.extra["responses"] == ["a", "b", "c"]
    assert all("n" not in body for body in script.sent)


async def test_budget_stops_before_anything_is_sent() -> None:
    time, tally = FakeTime(), Tally()
    script = Script.of(answer())
    with pytest.raises(BudgetStop):
        await process(script, time, tally, limits={"max_cost_usd": 1e-9})
    assert script.sent == []
    assert tally.inflight_cost_usd == 0


# -- stopping: nothing is sent once the run stops, and no paid reply is dropped -------------


class Stop:
    """A run's stop, taken while some part of a row sleeps: the sleep stops the run (as a
    signal, the budget or a stall would) and then returns, or waits until it is woken."""

    def __init__(self, time: FakeTime, *, wait: bool = False, reason: str = "signal") -> None:
        self.time = time
        self.wait = wait
        self.reason = reason
        self.stopping = Stopping(lambda _message: None)
        self.interrupted: list[Outcome] = []

    def now(self) -> None:
        """Stop the run as the runner does for ``reason``."""
        stopping = self.stopping
        if self.reason == "signal":
            stopping.wind_down(InterruptedRunError("interrupted by SIGTERM"), 10)
        elif self.reason == "stall":
            stopping.wind_down(RateLimitStallError("nothing but 429"), 10)
        elif self.reason == "budget":
            stopping.stop_dispatch(BudgetReachedError("the budget would be crossed"))
        else:
            stopping.stop_work(KeyRefusedError("key refused", status=401))

    async def sleep(self, seconds: float) -> None:
        if self.wait:
            await anyio.sleep_forever()  # only the stop's wake-up ends it
        self.time.now += seconds
        self.now()


@asynccontextmanager
async def stopping_worker(
    script: Script, stop: Stop, tally: Tally, *, pace: bool, **sections: Any
) -> AsyncIterator[tuple[RowWorker, RequestBuilder]]:
    """A row worker whose pacing (``pace``) or retry waits are ``stop``'s sleep."""
    config = job_config(**sections)
    builder = RequestBuilder(config.request, BASE_URL)
    time = stop.time
    pace_sleep = stop.sleep if pace else time.pace_sleep
    flow = FlowController(config.limits, clock=time.clock, sleep=pace_sleep)
    stop.stopping.attach(flow)
    images = ImageLoader(Path("."), config.images)
    transport = httpx.MockTransport(script)
    async with ChatClient(config.endpoint, None, 4, transport=transport) as client:
        sender = Sender.for_job(config, builder, client, flow, images, tally, clock=time.clock)
        worker = RowWorker.for_job(
            config,
            builder,
            sender,
            OutputParser(config),
            PriceTable.load(),
            tally,
            sleep=time.retry_sleep if pace else stop.sleep,
            clock=time.clock,
        )
        worker.interrupted = stop.interrupted.append
        yield worker, builder


PACED = {"limits": {"requests_per_minute": 60}}  # one request a second: the second one waits


@pytest.mark.parametrize("reason", ["signal", "stall", "budget", "key"])
async def test_a_request_whose_place_comes_after_the_stop_is_not_sent(reason: str) -> None:
    time, tally = FakeTime(), Tally()
    stop, script = Stop(time, reason=reason), Script.of(answer())
    async with stopping_worker(script, stop, tally, pace=True, **PACED) as (worker, builder):
        assert (await worker.process(builder.build("k1", {"text": "a"}))).ok
        # k2 waits a second for its place; the run stops meanwhile; then the place comes.
        with pytest.raises(Halted):
            await worker.process(builder.build("k2", {"text": "b"}))
    assert stop.time.now == 1.0  # the place was granted, after the stop
    assert len(script.sent) == 1
    assert (tally.requests, stop.interrupted) == (1, [])
    assert worker.sender.flow.in_flight == 0


async def test_rows_waiting_for_room_or_the_pace_are_woken_by_the_stop() -> None:
    time, tally = FakeTime(), Tally()
    stop, script = Stop(time, wait=True), Script.of(answer())
    sections = merge(PACED, {"limits": {"concurrency": 2}})
    halted: list[str] = []
    async with stopping_worker(script, stop, tally, pace=True, **sections) as (worker, builder):

        async def row(key: str) -> None:
            try:
                await worker.process(builder.build(key, {"text": key}))
            except Halted:
                halted.append(key)

        with anyio.fail_after(10):  # only if a waiter were never woken
            async with anyio.create_task_group() as rows:
                for i in range(6):  # one answered, two wait for the pace, three for room
                    rows.start_soon(row, f"k{i}")
                await anyio.wait_all_tasks_blocked()
                assert worker.sender.flow.pacer.waiting == 2
                stop.now()
    assert len(script.sent) == 1
    assert sorted(halted) == [f"k{i}" for i in range(1, 6)]
    assert time.now == 0.0  # woken: no wait ran to its end
    assert worker.sender.flow.in_flight == 0


async def test_a_retry_waiting_at_the_stop_is_cut_short_and_not_sent() -> None:
    time, tally = FakeTime(), Tally()
    stop, script = Stop(time, wait=True), Script.of(refusal(503), answer())
    async with stopping_worker(script, stop, tally, pace=False) as (worker, builder):
        with anyio.fail_after(10):
            async with anyio.create_task_group() as rows:

                async def row() -> None:
                    with pytest.raises(Halted):
                        await worker.process(builder.build("k1", {"text": "a"}))

                rows.start_soon(row)
                await anyio.wait_all_tasks_blocked()
                stop.now()
    assert len(script.sent) == 1
    assert stop.interrupted == []  # a 503 is not paid for: the row stays pending


async def test_a_fan_out_row_stopped_midway_keeps_the_reply_it_paid_for() -> None:
    time, tally = FakeTime(), Tally()
    stop, script = Stop(time), Script.of(answer("a"), answer("b"))
    fanout = {"request": {"n": 2, "n_mode": "fanout"}, **PACED}
    async with stopping_worker(script, stop, tally, pace=True, **fanout) as (worker, builder):
        with pytest.raises(Halted):
            await worker.process(builder.build("k1", {"text": "a"}))
    assert len(script.sent) == 1
    (outcome,) = stop.interrupted
    assert (outcome.ok, outcome.error_kind, outcome.attempts) == (False, "interrupted", 1)
    assert outcome.response == "a"
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (10, 5)
    assert outcome.cost_usd == pytest.approx(tally.cost_usd)
    assert tally.cost_usd > 0


async def test_a_reply_that_did_not_parse_is_kept_when_the_stop_cuts_its_retry() -> None:
    time, tally = FakeTime(), Tally()
    stop, script = Stop(time), Script.of(answer("not json"), answer("{}"))
    json_output = {"parse": "json", "schema": {"type": "object", "properties": {}}}
    async with stopping_worker(script, stop, tally, pace=False, output=json_output) as (
        worker,
        builder,
    ):
        with pytest.raises(Halted):
            await worker.process(builder.build("k1", {"text": "a"}))
    assert len(script.sent) == 1
    (outcome,) = stop.interrupted
    assert (outcome.error_kind, outcome.response, outcome.prompt_tokens) == (
        "interrupted",
        "not json",
        10,
    )
    assert outcome.cost_usd == pytest.approx(tally.cost_usd)
