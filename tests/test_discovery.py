"""Discovery on simulated time: congestion found and held, noise told apart, limits followed.

A small model of a server (a token bucket whose rate can change, and 429s at random) answers
requests sent at the rate discovery sets; nothing sleeps, so minutes pass in milliseconds.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from batcher.flow.discovery import Discovery
from batcher.flow.observed import SERVED_S, ServedRate

UNPACED_RPS = 200.0  # how fast a client without a rate sends, in this model


@dataclass
class Model:
    """A bucket server and a client paced by discovery (or a job's ceiling)."""

    limit_rps: Callable[[float], float | None]  # the server's rate at a time; None: no limit
    ceiling_rps: float | None = None  # the job's rate
    noise: float = 0.0  # share of requests refused at random
    burst_s: float = 1.0
    seed: int = 0
    discovery: Discovery = field(default_factory=Discovery)
    answers: list[tuple[float, bool]] = field(default_factory=list)  # (time, refused)
    rates: list[tuple[float, float]] = field(default_factory=list)  # (time, rate in force)

    def pacing(self) -> float | None:
        found = self.discovery.rate_rps
        if found is None:
            return self.ceiling_rps
        return found if self.ceiling_rps is None else min(found, self.ceiling_rps)

    def run(self, seconds: float) -> None:
        rng = random.Random(self.seed)
        now, tick, level, refilled = 0.0, 1.0, None, 0.0
        while now < seconds:
            rate = self.pacing() or UNPACED_RPS
            now += 1 / rate
            limit = self.limit_rps(now)
            refused = rng.random() < self.noise
            if limit is not None and not refused:
                capacity = max(1.0, limit * self.burst_s)
                level = capacity if level is None else level
                level = min(capacity, level + (now - refilled) * limit)
                refilled = now
                refused = level < 1
                if not refused:
                    level -= 1
            self.answers.append((now, refused))
            self.discovery.record(now, self.discovery.epoch, limited=refused, pacing=self.pacing)
            while now >= tick:
                self.discovery.grow(tick, 1.0, pace_binds=True)
                found = self.discovery.rate_rps
                if found is not None and self.ceiling_rps is not None and found >= self.ceiling_rps:
                    self.discovery.release()
                self.rates.append((tick, self.pacing() or UNPACED_RPS))
                tick += 1.0

    def served_rps(self, start: float, end: float) -> float:
        return sum(1 for t, refused in self.answers if start <= t < end and not refused) / (
            end - start
        )

    def refused_share(self, start: float = 0.0, end: float = float("inf")) -> float:
        inside = [refused for t, refused in self.answers if start <= t < end]
        return sum(inside) / len(inside)


def test_an_unstated_limit_is_found_and_held() -> None:
    model = Model(limit_rps=lambda _: 20.0)
    model.run(120)
    assert model.discovery.cuts >= 1
    assert model.discovery.noise_share == 0.0
    assert model.served_rps(10, 120) >= 0.9 * 20
    assert model.refused_share() <= 0.05
    assert model.refused_share(30, 120) <= 0.02


def test_a_job_three_times_the_limit_converges() -> None:
    model = Model(limit_rps=lambda _: 20.0, ceiling_rps=60.0)
    model.run(120)
    assert model.served_rps(10, 120) >= 0.9 * 20
    assert model.refused_share(30, 120) <= 0.02


def test_random_429s_are_noise_and_do_not_lower_the_rate() -> None:
    model = Model(limit_rps=lambda _: None, ceiling_rps=20.0, noise=0.08, seed=3)
    model.run(120)
    assert model.discovery.noise_verdicts >= 1
    assert 0.04 <= model.discovery.noise_share <= 0.15
    assert model.discovery.rate_rps is None  # nothing discovered: the job's rate stands
    # Answers (refused or not) kept coming at the job's rate.
    assert len(model.answers) / 120 >= 0.9 * 20


@pytest.mark.parametrize("seed", range(5))
def test_noise_never_spirals_the_rate_down(seed: int) -> None:
    model = Model(limit_rps=lambda _: None, ceiling_rps=50.0, noise=0.05, seed=seed)
    model.run(90)
    assert min(rate for t, rate in model.rates if t >= 30) >= 0.8 * 50


def test_a_limit_under_noise_is_still_found() -> None:
    # Over ten seeds: a single one can meet noise that mimics congestion at a bad moment.
    served, refused = [], []
    for seed in range(10):
        model = Model(limit_rps=lambda _: 20.0, ceiling_rps=60.0, noise=0.05, seed=seed)
        model.run(120)
        served.append(model.served_rps(20, 120))
        refused.append(model.refused_share(30, 120))
    assert statistics.median(served) >= 0.9 * 20 * 0.95
    assert min(served) >= 0.75 * 20 * 0.95
    # 429s beyond the noise's 5 %: a few points typically, less than ten at worst.
    assert statistics.median(refused) <= 0.05 + 0.03
    assert max(refused) <= 0.05 + 0.08


def test_the_rate_follows_a_limit_down_and_back_up() -> None:
    def limit(t: float) -> float:
        return 10.0 if 60 <= t < 120 else 20.0

    model = Model(limit_rps=limit)
    model.run(200)
    down = next(t for t, rate in model.rates if t >= 60 and rate <= 1.1 * 10)
    assert down - 60 <= 10
    up = next(t for t, rate in model.rates if t >= 120 and rate >= 0.9 * 20)
    assert up - 120 <= 60


def test_growth_holds_while_the_pace_is_not_what_binds() -> None:
    discovery = Discovery()
    model = Model(limit_rps=lambda _: 20.0, discovery=discovery)
    model.run(20)
    found = discovery.rate_rps
    assert found is not None
    for second in range(21, 200):
        discovery.grow(float(second), 1.0, pace_binds=False)
    assert discovery.rate_rps == pytest.approx(found, rel=1e-9)


def test_noise_trials_rarely_keep_a_cut() -> None:
    # A suspicion fires at a high point of the share, so a trial that compared the share after
    # its cut with that sample, and looked at every answer, kept a false cut in about one run
    # of six; the verdict must be rare enough that a run keeps its rate.
    kept = 0
    for seed in range(100):
        model = Model(limit_rps=lambda _: None, ceiling_rps=20.0, noise=0.08, seed=seed)
        model.run(60)
        kept += model.discovery.cuts > 0
    assert kept <= 2


def test_the_served_rate_keeps_only_its_last_seconds() -> None:
    # A run without 429s never asks for the served rate; what it keeps must not grow with it.
    served = ServedRate()
    for i in range(100_000):
        served.add(i / 1000)
    assert len(served._times) <= SERVED_S * 1000 + 1
    assert served.rps(100.0, since=float("-inf")) == pytest.approx(1000, rel=0.01)


def test_a_first_cut_too_shallow_is_followed_at_once_by_a_deeper_one() -> None:
    # The server's opening burst makes the last answers look better than the server is, so
    # the first cut (from three times the limit) is too shallow; the next one goes as soon as
    # its 429s stay thick, instead of after a new suspicion: fewer 429s before the rate holds.
    model = Model(limit_rps=lambda _: 20.0, ceiling_rps=60.0)
    model.run(60)
    assert sum(1 for t, refused in model.answers if refused and t < 5) <= 7
    assert model.served_rps(5, 60) >= 0.9 * 20


def feed(discovery: Discovery, now: float, answers: str, rps: float = 20.0) -> float:
    """Answers one after another at ``rps`` ("." a success, "x" a 429) paced at ``rps``."""
    for answer in answers:
        now += 1 / rps
        discovery.record(now, discovery.epoch, limited=answer == "x", pacing=lambda: rps)
    return now


def test_three_429s_among_the_last_answers_are_a_suspicion_while_no_noise_is_known() -> None:
    # Over 5 s (100 answers) three 429s are not significant against the assumed 1 % noise;
    # among the last 40 answers they are: a rate just past the limit is cut sooner.
    discovery = Discovery()
    now = feed(discovery, 0.0, "." * 100)
    feed(discovery, now, ".........x.........x.........x")
    assert discovery.trial_running


def test_a_share_that_rises_after_a_cut_is_not_noise() -> None:
    discovery = Discovery()
    now = feed(discovery, 0.0, "." * 100 + "x" + "." * 12 + "x" + "." * 12 + "x")
    assert discovery.trial_running
    cut = discovery.rate_rps
    assert cut is not None
    # After the cut the share rises (the cut was just too shallow), never past a quarter.
    feed(discovery, now, ("......x" * 20)[:120], rps=cut)
    assert discovery.noise_verdicts == 0
    assert discovery.noise_share == 0.0
    assert discovery.rate_rps is not None
    assert discovery.rate_rps <= cut


def test_a_proven_cut_lowers_a_noise_share_learned_by_mistake() -> None:
    discovery = Discovery()
    discovery.noise_share = 0.2  # as if a congestion had been taken for noise
    now = feed(discovery, 0.0, "." * 30 + "xxx." * 10)
    assert discovery.trial_running
    cut = discovery.rate_rps
    assert cut is not None
    feed(discovery, now, "." * 200, rps=cut)
    assert discovery.cuts == 1
    # What the proving trial saw under the limit, three 429s of the last pattern among 40.
    assert discovery.noise_share < 0.1
