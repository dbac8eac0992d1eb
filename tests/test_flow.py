"""The flow controller on a fake clock: where limits come from, concurrency, stalls, bounds."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from batcher.config import LimitsConfig
from batcher.flow.controller import FlowController
from batcher.flow.limiter import Cost
from batcher.flow.rates import HEADER_SHARE
from batcher.flow.server_limits import ServerLimits, StatedLimit
from tests.test_limiter import FakeTime


def controller(time: FakeTime, **limits: Any) -> FlowController:
    return FlowController(LimitsConfig(**limits), clock=time.clock, sleep=time.sleep)


def stated(per_minute: float, remaining: float | None = None) -> ServerLimits:
    return ServerLimits({"requests": StatedLimit(per_minute, remaining, 1.0)}, "openai")


async def answer(flow: FlowController, time: FakeTime, latency_s: float = 0.1, **kw: Any) -> None:
    async with flow.slot(Cost(10, 10)) as slot:
        time.now += latency_s
        slot.answered(Cost(10, 10), kw.get("limits"))


@pytest.mark.anyio
async def test_server_headers_pace_when_the_job_states_nothing() -> None:
    time = FakeTime()
    flow = controller(time)
    assert flow.requests_per_s is None
    await answer(flow, time, limits=stated(600))
    assert flow.requests_per_s == pytest.approx(10 * HEADER_SHARE)
    assert flow.status().source == "headers"
    assert flow.report().headers == {"requests": pytest.approx(600)}
    started = time.now
    for _ in range(20):
        await answer(flow, time, latency_s=0.0, limits=stated(600))
    assert time.now - started == pytest.approx(2.0 / HEADER_SHARE, abs=0.11)


@pytest.mark.anyio
async def test_the_lowest_limit_wins_and_adaptive_false_keeps_the_job_s() -> None:
    time = FakeTime()
    flow = controller(time, requests_per_minute=300)
    await answer(flow, time, limits=stated(600))
    assert flow.requests_per_s == pytest.approx(5)
    assert flow.status().source == "job"
    flow = controller(time, requests_per_minute=1200)
    await answer(flow, time, limits=stated(600))
    assert flow.status().source == "headers"
    fixed = controller(time, requests_per_minute=1200, adaptive=False)
    await answer(fixed, time, limits=stated(600))
    assert fixed.requests_per_s == pytest.approx(20)  # headers ignored: the job's exact pace


@pytest.mark.anyio
async def test_no_requests_remaining_holds_everyone_briefly() -> None:
    time = FakeTime()
    flow = controller(time)
    await answer(flow, time, latency_s=0.0, limits=stated(60, remaining=0))
    assert flow.pacer.paused_until == pytest.approx(time.now + 1.0)  # one slot at 60/min


@pytest.mark.anyio
async def test_auto_concurrency_follows_littles_law() -> None:
    time = FakeTime()
    flow = controller(time, requests_per_minute=1200)  # 20 a second
    assert flow.status().concurrency == 16  # before anything is measured
    for _ in range(20):
        await answer(flow, time, latency_s=2.0)
    flow.tick()
    # 20/s times 2 s in flight, a fifth more, two spare: 50.
    assert flow.status().concurrency == 50
    fixed = controller(time, requests_per_minute=1200, concurrency=8)
    for _ in range(5):
        await answer(fixed, time, latency_s=2.0)
    fixed.tick()
    assert fixed.status().concurrency == 8  # a number is a hard cap


@pytest.mark.anyio
async def test_auto_concurrency_is_bounded_by_body_bytes() -> None:
    time = FakeTime()
    flow = controller(time, requests_per_minute=6000)
    for _ in range(10):
        async with flow.slot(Cost(10, 10)) as slot:
            slot.body_bytes = 8 * 1024 * 1024  # an 8 MiB image body
            time.now += 5.0
            slot.answered(Cost(10, 10))
    flow.tick()
    assert flow.status().concurrency == 32  # 256 MiB of bodies in flight at most


@pytest.mark.anyio
async def test_only_429s_for_the_stall_timeout_is_a_stall() -> None:
    time = FakeTime()
    flow = controller(time, stall_timeout_s=60)
    await answer(flow, time)
    for _ in range(30):
        async with flow.slot(Cost(1, 1)) as slot:
            time.now += 1.0
            slot.rate_limited(1.0)
        assert not flow.stalled()
    time.now += 31
    async with flow.slot(Cost(1, 1)) as slot:
        slot.rate_limited(1.0)
    assert flow.stalled()
    await answer(flow, time)  # one answer and it is not stalled any more
    assert not flow.stalled()


@pytest.mark.anyio
async def test_a_full_fixed_concurrency_is_named_as_the_bound() -> None:
    time = FakeTime()
    flow = controller(time, concurrency=1)
    entered = anyio.Event()
    release = anyio.Event()

    async def hold() -> None:
        async with flow.slot(Cost(1, 1)) as slot:
            entered.set()
            await release.wait()
            slot.answered(Cost(1, 1))

    async with anyio.create_task_group() as group:
        group.start_soon(hold)
        await entered.wait()
        group.start_soon(answer, flow, time)
        await anyio.wait_all_tasks_blocked()
        assert flow.bound() == "concurrency"
        flow.tick()
        release.set()
    assert "concurrency" in flow.bound_seconds  # counted in the summary's shares


@pytest.mark.anyio
async def test_a_paced_job_is_bound_by_its_rate() -> None:
    time = FakeTime()
    proceed = anyio.Event()

    async def sleep(_: float) -> None:  # holds sleepers until the test lets them go
        await proceed.wait()
        time.now += 1.0

    flow = FlowController(LimitsConfig(requests_per_minute=60), clock=time.clock, sleep=sleep)
    async with anyio.create_task_group() as group:
        for _ in range(3):
            group.start_soon(answer, flow, time, 0.0)
        await anyio.wait_all_tasks_blocked()
        assert flow.bound() == "rate"  # two wait for their slot at the job's pace
        assert flow.status().describe().startswith("rate 60/min (job)")
        proceed.set()
    assert flow.bound() is None


@pytest.mark.anyio
async def test_a_request_cancelled_while_it_waits_for_its_pace_gives_its_place_back() -> None:
    flow = FlowController(LimitsConfig(concurrency=1, requests_per_minute=60))
    async with flow.slot(Cost(1, 1)) as slot:  # the first goes at once
        slot.answered(Cost(1, 1))
    with anyio.move_on_after(0.05):
        async with flow.slot(Cost(1, 1)):  # the next waits a second for its pace
            pytest.fail("sent before its pace")
    assert flow.status().in_flight == 0
    assert flow.bound() is None  # the one place in flight is free again, not "concurrency"


@pytest.mark.anyio
async def test_a_wait_asked_longer_than_the_stall_timeout_is_a_stall_at_once() -> None:
    time = FakeTime()
    flow = controller(time, stall_timeout_s=900)
    async with flow.slot(Cost(1, 1)) as slot:
        slot.rate_limited(899.0)
    assert not flow.stalled()  # shorter than the stall timeout: waited
    async with flow.slot(Cost(1, 1)) as slot:
        slot.failed(None, retry_after_s=1000.0)  # a 503's Retry-After, say
    assert flow.stall() == (
        "the server asked to wait 1,000 s (Retry-After), longer than limits.stall_timeout_s=900 s"
    )
    await answer(flow, time)  # an answer does not undo it: the retry would still wait that long
    assert flow.stalled()


@pytest.mark.anyio
async def test_a_stated_rate_slower_than_the_stall_timeout_is_a_stall() -> None:
    time = FakeTime()
    flow = controller(time, stall_timeout_s=60)
    tokens = ServerLimits({"tokens": StatedLimit(per_minute=30)}, "openai")
    await answer(flow, time, limits=tokens)  # 20 tokens a request: 40 s each
    flow.tick()
    assert not flow.stalled()
    await answer(flow, time, limits=ServerLimits({"tokens": StatedLimit(10)}, "openai"))
    flow.tick()  # 2 minutes a request
    stall = flow.stall()
    assert stall is not None
    assert "between requests, at the rate its headers state" in stall
