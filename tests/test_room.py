"""A stated request limit is the target: the room its replies leave, the small cut a 429 under
it makes, and the simulator's headers that state it truthfully for every limiter."""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any

import httpx
import pytest
from trio.testing import MockClock

from batcher.flow.rates import HEADER_SHARE
from batcher.flow.room import TUNING, StatedRoom
from batcher.flow.server_limits import ServerLimits, StatedLimit, read_server_limits
from batcher.sim import limits as sim_limits
from batcher.sim.limits import LIMITER_KINDS, Meter, advertise, meter
from bench.pacing import CASES, STATED_ROWS, STATED_RPM, rate_over_time
from tests.virtual import run_case


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


def test_no_request_goes_past_what_remains() -> None:
    room = StatedRoom()
    assert room.sent(0.0, 0.1) is None  # nothing stated yet: nothing held
    room.read(StatedLimit(900, remaining=3, reset_s=5.0), now=0.0)
    assert room.sent(0.0, 0.1) is None  # 2 left
    assert room.sent(0.0, 0.1) is None  # 1 left: the spare
    assert room.sent(0.0, 0.1) == 0.1  # none left: held one interval at the stated rate
    # A newer reply states the room again, counting what was sent before it.
    room.read(StatedLimit(900, remaining=10, reset_s=5.0), now=0.2)
    assert room.sent(0.2, 0.1) is None
    # Held no longer than until the limit is whole again.
    room.read(StatedLimit(900, remaining=1, reset_s=0.03), now=1.0)
    assert room.sent(1.0, 0.1) == pytest.approx(0.03)


def test_a_429_cuts_a_little_for_a_moment() -> None:
    room = StatedRoom()
    assert room.share(0.0) == 1.0
    room.answered(10.0, limited=True)
    assert room.share(10.5) * HEADER_SHARE == pytest.approx(TUNING.cut_share)
    assert 0.9 <= TUNING.cut_share < HEADER_SHARE  # bounded: never discovery's deep cut
    assert room.share(10.0 + TUNING.calm_s) == 1.0  # back as soon as 429s stop


def test_429s_that_keep_coming_doubt_the_stated_limit() -> None:
    room = StatedRoom()
    room.answered(0.0, limited=True)  # one edge met, then calm: no doubt
    for i in range(100):
        room.answered(0.1 + i * 0.05, limited=False)
    assert not room.doubted
    for i in range(TUNING.doubt_answers):  # one 429 in five: not one edge
        room.answered(10.0 + i * 0.05, limited=i % 5 == 0)
    assert room.doubted


def test_a_reply_with_no_room_is_full() -> None:
    full = ServerLimits({"requests": StatedLimit(900, remaining=0, reset_s=1.0)}, "openai")
    room_left = ServerLimits({"requests": StatedLimit(900, remaining=5, reset_s=1.0)}, "openai")
    assert StatedRoom.full(full)
    assert not StatedRoom.full(room_left)
    assert not StatedRoom.full(None)


@pytest.mark.parametrize("style", ["openai", "anthropic"])
@pytest.mark.parametrize("kind", LIMITER_KINDS)
def test_the_simulator_states_remaining_and_reset_truthfully(kind: str, style: str) -> None:
    """What the headers say remains is what is taken at once; once the reset they state has
    passed, the limit is whole again."""
    found = meter(kind, 900, burst_s=1.0, window_s=10.0, now=0.0)
    whole = found.remaining(0.0)
    for i in range(40):  # a paced run that took part of the budget
        found.take(1, i * 0.1)
    now = 4.05
    limits = read_server_limits(httpx.Headers(advertise(style, {"requests": found}, now)))
    assert limits is not None
    stated = limits.budgets["requests"]
    assert stated.per_minute == 900
    assert stated.remaining is not None
    assert stated.reset_s is not None
    # Once the stated reset has passed, with nothing more taken, the limit is whole; Anthropic
    # states whole seconds, rounded up (never earlier than the truth), OpenAI milliseconds.
    untouched = copy.deepcopy(found)
    late = 1.01 if style == "anthropic" else 0.001
    assert found.reset_s(now) - 0.001 <= stated.reset_s <= found.reset_s(now) + late
    assert untouched.remaining(now + stated.reset_s) == pytest.approx(whole)
    remaining = int(stated.remaining)
    assert all(found.take(1, now) == 0 for _ in range(remaining))
    assert found.take(1, now) > 0  # ... and no more


@pytest.mark.anyio
@pytest.mark.parametrize("case", ["stated openai, sliding", "stated anthropic, fixed"])
async def test_a_429_under_a_stated_limit_is_no_deep_cut(tmp_path: Path, case: str) -> None:
    """The first window's edge is met (the opening burst counts in it): the 429 holds
    everyone until the window has room, makes no discovered rate, and the run goes on at the
    stated rate (before: discovery cut to 200/min and the run took 117 s, 57 % of it)."""
    server, limits = CASES[case]
    result = await run_case(tmp_path, STATED_ROWS, server, limits)
    assert result.summary.rows_ok == STATED_ROWS
    assert 1 <= result.simulator.statuses["429"] <= 3
    flow = result.summary.flow
    assert flow is not None
    assert flow.cuts == 0
    assert flow.lowest_discovered_rpm is None
    later = [rate for when, rate in rate_over_time(result.answered_at) if 15 <= when <= 60]
    assert min(later) >= 0.9 * STATED_RPM, min(later)
    assert statistics.median(later) >= 0.97 * STATED_RPM


@pytest.mark.anyio
async def test_a_stated_limit_that_is_not_enforced_goes_to_discovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that states twice the limit its bucket enforces: 429s keep coming under the
    small cut, the stated limit is doubted and discovery finds the real one (without the
    doubt: 43 % of requests refused)."""
    stated = sim_limits.advertise

    def doubled(style: str, meters: dict[str, Meter], now: float) -> dict[str, str]:
        headers = stated(style, meters, now)
        name = "x-ratelimit-limit-requests"
        headers[name] = str(2 * int(headers[name]))
        return headers

    monkeypatch.setattr(sim_limits, "advertise", doubled)
    server = {**CASES["stated openai, bucket"][0]}
    result = await run_case(tmp_path, STATED_ROWS, server, {})
    assert result.summary.rows_ok == STATED_ROWS
    assert result.share_429 <= 0.03, result.simulator.statuses
    assert result.of_limit >= 0.85, f"{result.of_limit:.1%} of the limit"
    flow = result.summary.flow
    assert flow is not None
    assert flow.headers["requests"] == pytest.approx(2 * STATED_RPM)
    assert flow.cuts >= 1
