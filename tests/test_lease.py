"""The shared pace's lease arithmetic, with a fake clock: no Ray, nothing waits."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batcher.config import LimitsConfig
from batcher.flow.limiter import Cost
from batcher.runs.ray.lease import (
    HORIZON_S,
    SAVE_EVERY_S,
    Answer,
    Grant,
    LeasedPacer,
    PaceState,
    ReservingLimiter,
    SharedPace,
)
from tests.conftest import write_job


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)
        await anyio.lowlevel.checkpoint()


def limits(**values: object) -> LimitsConfig:
    return LimitsConfig.model_validate(values)


def test_grants_only_within_the_horizon_and_says_when_to_come_back() -> None:
    clock = FakeClock()
    budget = SharedPace(limits(requests_per_minute=600, adaptive=False), clock=clock)
    grant = budget.lease([Cost()] * 50)
    # 10 a second: slots at 0, 0.1 ... start within the half-second horizon, no later.
    assert len(grant.starts) >= int(10 * HORIZON_S)
    assert max(grant.starts) <= clock.now + HORIZON_S
    assert grant.starts == pytest.approx([clock.now + i * 0.1 for i in range(len(grant.starts))])
    assert grant.retry_at is not None
    assert clock.now < grant.retry_at <= clock.now + 0.2


def test_many_workers_never_exceed_the_rate_together() -> None:
    """Four workers asking in turn for a minute get the job's rate, not four times it."""
    clock = FakeClock()
    budget = SharedPace(limits(requests_per_minute=1200, adaptive=False), clock=clock)
    starts: list[float] = []
    retry: dict[int, float] = dict.fromkeys(range(4), clock.now)
    while clock.now < 1_060.0:
        worker = min(retry, key=retry.__getitem__)
        clock.now = max(clock.now, retry[worker])
        grant = budget.lease([Cost()] * 16)
        starts += grant.starts
        retry[worker] = grant.retry_at if grant.retry_at is not None else clock.now + 0.01
    starts.sort()
    assert all(b - a >= 1 / 20 - 1e-9 for a, b in itertools.pairwise(starts))
    in_minute = [s for s in starts if s < 1_060.0]
    assert 1_195 <= len(in_minute) <= 1_201


def test_a_retry_after_for_everyone_holds_every_worker() -> None:
    clock = FakeClock()
    budget = SharedPace(limits(requests_per_minute=600), clock=clock)
    budget.lease([Cost()])
    # More than half of the recent answers are 429s: the server refuses nearly everything.
    answers = [Answer("rate_limited", Cost(), clock.now, 0, retry_after_s=5.0) for _ in range(12)]
    budget.report(answers)
    grant = budget.lease([Cost()] * 3)
    assert grant.starts == ()
    assert grant.retry_at == pytest.approx(clock.now + 5.0)  # not sooner: no asking in a loop
    clock.now += 5.0
    assert len(budget.lease([Cost()]).starts) == 1


def test_tokens_are_a_budget_too() -> None:
    clock = FakeClock()
    pacer = ReservingLimiter(clock=clock)
    pacer.set_rate("tokens", 1_000.0)  # per second
    grant = pacer.grant([Cost(input_tokens=400, output_tokens=100)] * 5, horizon_s=1.0)
    # 500 tokens each at 1,000/s: a slot every half second, three within a second.
    assert grant == pytest.approx((clock.now, clock.now + 0.5, clock.now + 1.0))


def test_a_restarted_budget_does_not_burst() -> None:
    """The state saved before a restart says where the clocks stood; slots granted after the
    save are unknown, so the restored budget starts after anything that could have been."""
    clock = FakeClock()
    job = limits(requests_per_minute=1200, adaptive=False)
    first = SharedPace(job, clock=clock)
    saved = PaceState.of_json(first.state().as_json())
    granted: list[float] = []
    for _ in range(10):  # the old incarnation goes on granting after its last save
        granted += first.lease([Cost()] * 16).starts
        clock.now += 0.1
    second = SharedPace(job, clock=clock)
    second.restore(saved)
    after = second.lease([Cost()] * 64)
    assert after.starts == () or after.starts[0] >= saved.saved_at + SAVE_EVERY_S
    assert max(granted) <= saved.saved_at + SAVE_EVERY_S + HORIZON_S


def test_a_restart_keeps_a_pause() -> None:
    clock = FakeClock()
    job = limits(requests_per_minute=600)
    first = SharedPace(job, clock=clock)
    first.pacer.pause_until(clock.now + 30)
    second = SharedPace(job, clock=clock)
    second.restore(PaceState.of_json(first.state().as_json()))
    clock.now += 10
    assert second.lease([Cost()]).starts == ()


class InProcess:
    """The shared budget called directly, as the actor would be."""

    def __init__(self, budget: SharedPace) -> None:
        self.budget = budget
        self.calls = 0
        self.reported: list[Answer] = []

    async def lease(self, costs: Sequence[Cost], answers: Sequence[Answer]) -> Grant:
        self.calls += 1
        self.reported += answers
        await anyio.lowlevel.checkpoint()
        return self.budget.lease(costs, answers)

    def report(self, answers: Sequence[Answer]) -> None:
        self.reported += answers
        self.budget.report(answers)


@pytest.mark.anyio
async def test_leased_pacers_share_one_rate() -> None:
    """Two workers, 40 concurrent requests each, at 600/min in all: requests start a tenth
    of a second apart whoever sends them, and few calls reach the shared side."""
    clock = FakeClock()
    source = InProcess(SharedPace(limits(requests_per_minute=600), clock=clock))
    sent: list[float] = []

    async def send(pacer: LeasedPacer) -> None:
        await pacer.acquire(Cost())
        sent.append(clock.now)

    async with anyio.create_task_group() as group:
        for pacer in (LeasedPacer(source, wall=clock, sleep=clock.sleep) for _ in range(2)):
            for _ in range(40):
                group.start_soon(send, pacer)
    sent.sort()
    assert len(sent) == 80
    assert sent[-1] - sent[0] == pytest.approx(7.9, abs=0.11)
    assert source.calls < 80 / 2  # leases of several slots, not one call a request


@pytest.mark.anyio
async def test_a_halted_pacer_lets_its_queue_go_and_asks_for_no_more_slots() -> None:
    """The run stopped: requests queued for a lease or sleeping for their slot return at once
    (their places are then refused), and the shared budget is asked for nothing more."""
    clock = FakeClock()
    source = InProcess(SharedPace(limits(requests_per_minute=60), clock=clock))

    async def forever(_seconds: float) -> None:
        await anyio.sleep_forever()  # only the halt ends a wait

    pacer = LeasedPacer(source, wall=clock, sleep=forever)
    returned: list[int] = []

    async def send(i: int) -> None:
        await pacer.acquire(Cost())
        returned.append(i)

    with anyio.fail_after(10):  # only if a waiter were never let go
        async with anyio.create_task_group() as group:
            for i in range(20):
                group.start_soon(send, i)
            await anyio.wait_all_tasks_blocked()
            calls = source.calls
            assert len(returned) == 1  # one a second: the first goes, the rest wait
            pacer.halt()
    assert sorted(returned) == list(range(20))
    assert source.calls == calls
    assert clock.now == 1_000.0


def test_nothing_of_ray_is_imported_without_the_flag(tmp_path: Path) -> None:
    """A whole run on one machine (the simulator) leaves Ray unimported."""
    job = write_job(tmp_path, "http://127.0.0.1:9/v1")
    code = (
        "import sys\n"
        "from batcher.runs.shell import run\n"
        f"summary = run({str(job)!r}, simulate=True, quiet=True)\n"
        "assert summary.rows_ok == 20, summary\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@settings(max_examples=200, deadline=None)
@given(
    calls=st.lists(
        st.tuples(st.floats(0, 0.3), st.integers(1, 20), st.integers(0, 3_000)), max_size=200
    ),
    per_minute=st.sampled_from([60, 600, 1200, 6000]),
)
def test_no_window_holds_more_than_the_rate(
    calls: list[tuple[float, int, int]], per_minute: int
) -> None:
    """Whatever the order, timing and size of the workers' lease calls, the slots granted
    in any stretch of time are at most what the rate allows in it, plus one."""
    clock = FakeClock()
    budget = SharedPace(limits(requests_per_minute=per_minute, adaptive=False), clock=clock)
    starts: list[float] = []
    for advance, count, tokens in calls:
        clock.now += advance
        starts += budget.lease([Cost(input_tokens=tokens)] * count).starts
    starts.sort()
    # Slots at least 1/rate apart: then no stretch of t seconds holds more than t * rate + 1.
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert all(gap >= 60 / per_minute - 1e-9 for gap in gaps)
