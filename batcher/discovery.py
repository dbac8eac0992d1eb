"""Discovery: find a server's request rate from its 429s when nobody states it, and follow it.

Congestion and noise look alike one 429 at a time; they differ in how the 429 share answers a
change of rate. So every suspected congestion is a trial:

1. **Suspicion**: among the answers of the last ``RECENT_S`` seconds, 429s are significantly
   more than the noise share measured so far (a one-sided z-test, at least three of them).
2. **Cut**: the rate goes just under what the server was seen to serve (``CUT_SHARE`` of the
   successes per second over the last seconds), never below ``FLOOR`` of the rate before.
   Answers to requests sent before the cut are old news and are not counted.
3. **Verdict**, once enough answers to requests sent after the cut are in: if the 429 share
   fell significantly (two-proportion z-test), it was congestion: the cut stays and the rate
   then grows back on a CUBIC curve (RFC 8312), flat near the level where congestion was met
   and steeper beyond it, so a stable limit is probed gently and a raised one is found within
   a minute. If the share did not fall, the 429s are noise (a pooled upstream, other tenants):
   the cut is undone and the measured share becomes the noise floor later suspicions are
   judged against. A share above ``REFUSING`` is never noise.

Growth pauses while the pace is not what holds requests back (too few rows, concurrency),
since probing a rate that is not used proves nothing. Pure: time comes in as arguments.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

RECENT_S = 5.0  # the 429 share is judged over answers of this many seconds
SERVED_S = 3.0  # what the server serves now: successes over this span (at least 1 s)
CUT_SHARE = 0.95  # a cut aims just under the rate the server was seen to serve
FLOOR = 0.25  # one cut never goes below this share of the rate before it
PLATEAU_S = 12.0  # CUBIC's K: seconds to climb back to the rate where congestion was met
MIN_SHARE = 0.01  # the noise share assumed before any is measured
Z_SUSPECT = 3.0  # how far above the noise share the recent 429 share must be
Z_FELL = 2.0  # how significantly the share must fall after a cut to call it congestion
TRIAL_MIN_S = 1.0
TRIAL_MIN_ANSWERS = 20
REFUSING = 0.5  # a server refusing more than this share is congested, never noisy
_NOISE_DECAY = 0.1  # noise share moves this far towards a lower measured share per window


@dataclass(slots=True)
class _Trial:
    started: float
    before_answers: int
    before_limited: int
    prior_rate: float | None
    prior_peak: float | None
    prior_origin: float
    answers: int = 0
    limited: int = 0


class Discovery:
    """The discovered request rate (``rate_rps``, None while no limit is known)."""

    def __init__(self) -> None:
        self.rate_rps: float | None = None
        self.noise_share = 0.0
        self.epoch = 0  # bumped at every change of rate that makes earlier answers stale
        self.cuts = 0
        self.noise_verdicts = 0
        self.lowest_rps: float | None = None
        self._recent: deque[tuple[float, bool]] = deque()
        self._recent_limited = 0
        self._served: deque[float] = deque()
        self._first_success: float | None = None
        self._trial: _Trial | None = None
        self._peak: float | None = None  # where congestion was met (CUBIC's W_max)
        self._origin = 0.0  # when the growth curve started

    @property
    def trial_running(self) -> bool:
        return self._trial is not None

    def served_rps(self, now: float) -> float:
        """Successes per second over the last ``SERVED_S`` seconds (span at least 1 s)."""
        while self._served and self._served[0] < now - SERVED_S:
            self._served.popleft()
        if self._first_success is None:
            return 0.0
        span = min(SERVED_S, max(now - self._first_success, 1.0))
        return len(self._served) / span

    def record(self, now: float, epoch: int, *, limited: bool, pacing_rps: float | None) -> bool:
        """One answer (a success or a 429) to a request sent in ``epoch``; True if the rate
        changed. ``pacing_rps`` is the request rate in force now (None: unpaced)."""
        if not limited:
            self._served.append(now)
            if self._first_success is None:
                self._first_success = now
        if epoch != self.epoch:
            return False
        self._recent.append((now, limited))
        self._recent_limited += limited
        self._forget(now)
        trial = self._trial
        if trial is not None:
            trial.answers += 1
            trial.limited += limited
            return self._judge(now, trial)
        if limited and self._suspect():
            return self._cut(now, pacing_rps)
        return False

    def suspects(self, now: float) -> bool:
        """The recent 429 share is above the noise: a 429 now is likely congestion."""
        self._forget(now)
        return self._suspect()

    def grow(self, now: float, elapsed_s: float, *, pace_binds: bool) -> None:
        """Move along the growth curve (called about once a second)."""
        if not pace_binds:
            self._origin += elapsed_s  # an unused rate proves nothing: hold the curve
        if self._trial is not None or self._peak is None or self.rate_rps is None:
            return
        t = now - self._origin
        scale = (1 - CUT_SHARE) / PLATEAU_S**3
        self.rate_rps = max(self.rate_rps, self._peak * (1 + scale * (t - PLATEAU_S) ** 3))
        if len(self._recent) >= 100 and self._recent_limited / len(self._recent) < self.noise_share:
            share = self._recent_limited / len(self._recent)
            self.noise_share += (share - self.noise_share) * _NOISE_DECAY

    def release(self) -> None:
        """The discovered rate climbed past every other limit: forget it."""
        if self._trial is None:
            self.rate_rps = self._peak = None

    def _forget(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RECENT_S:
            self._recent_limited -= self._recent.popleft()[1]

    def _suspect(self) -> bool:
        answers, limited = len(self._recent), self._recent_limited
        if limited < 3 or answers < 10:
            return False
        expected = max(self.noise_share, MIN_SHARE)
        z = (limited / answers - expected) / math.sqrt(expected * (1 - expected) / answers)
        return z > Z_SUSPECT

    def _cut(self, now: float, pacing_rps: float | None) -> bool:
        served = self.served_rps(now)
        if served <= 0:
            return False  # nothing served yet to aim under: the Retry-After pauses cover it
        target = CUT_SHARE * served
        if pacing_rps is not None:
            target = min(max(target, FLOOR * pacing_rps), CUT_SHARE * pacing_rps)
        self._trial = _Trial(
            now,
            len(self._recent),
            self._recent_limited,
            self.rate_rps,
            self._peak,
            self._origin,
        )
        self.rate_rps = target
        self.lowest_rps = target if self.lowest_rps is None else min(self.lowest_rps, target)
        self._new_epoch()
        return True

    def _judge(self, now: float, trial: _Trial) -> bool:
        if now - trial.started < TRIAL_MIN_S or trial.answers < TRIAL_MIN_ANSWERS:
            return False
        before = trial.before_limited / trial.before_answers
        after = trial.limited / trial.answers
        pooled = (trial.before_limited + trial.limited) / (trial.before_answers + trial.answers)
        spread = math.sqrt(
            max(pooled * (1 - pooled), 1e-9) * (1 / trial.before_answers + 1 / trial.answers)
        )
        if (before - after) / spread > Z_FELL or after > REFUSING:
            # Congestion: the cut stays; growth starts from here.
            assert self.rate_rps is not None
            self._peak = self.rate_rps / CUT_SHARE
            self._origin = trial.started
            self._trial = None
            self.cuts += 1
            return False
        if trial.answers < max(2 * TRIAL_MIN_ANSWERS, trial.before_answers):
            return False
        # Noise: the share did not move with the rate. Undo the cut, remember the share.
        self.noise_share = max(self.noise_share, pooled)
        self.rate_rps, self._peak, self._origin = (
            trial.prior_rate,
            trial.prior_peak,
            trial.prior_origin + (now - trial.started),
        )
        self._trial = None
        self.noise_verdicts += 1
        self._new_epoch()
        return True

    def _new_epoch(self) -> None:
        self.epoch += 1
        self._recent.clear()
        self._recent_limited = 0
