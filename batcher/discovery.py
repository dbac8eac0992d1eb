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
   judged against (up to ``NOISE_MAX``; a server refusing more than that is still suspected,
   and each suspicion is a new trial, never a spiral of cuts).

Growth pauses while the pace is not what holds requests back (too few rows, concurrency),
since probing a rate that is not used proves nothing. Pure: time comes in as arguments.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

RECENT_S = 5.0  # the 429 share is judged over answers of this many seconds
LAST_ANSWERS = 20  # the 429 share of a paced rate that triggers a cut, over these answers
SERVED_S = 3.0  # what the server serves now: successes over this span
MIN_SPAN_S = 0.25
CUT_SHARE = 0.9  # a cut aims under the rate the server was seen to serve
FLOOR = 0.25  # one cut never goes below this share of the rate before it
UNSURE_SHARE = 0.75  # answers slower than this share of the pace measure the pace, not the server
PLATEAU_S = 15.0  # CUBIC's K: seconds to climb back to the rate where congestion was met
DOUBLING_S = 40.0  # beyond that rate, seconds until the probe reaches twice it
MIN_SHARE = 0.01  # the noise share assumed before any is measured
Z_SUSPECT = 3.5  # how far above the noise share the recent 429 share must be
Z_FELL = 3.0  # how significantly the share must fall after a cut to call it congestion
Z_FELL_PROBING = 1.0  # the same, when the cut came above a rate already proven too fast
TRIAL_MIN_S = 1.0
TRIAL_MIN_ANSWERS = 20
TRIAL_EXPECTED = 4  # a trial lasts until this many 429s would be in it, were nothing changed
SHALLOW = 0.25  # a share at least this high and no lower than before the cut: cut deeper
NOISE_MAX = 0.3  # 429s the pace does not cause are at most this share of answers
NOISE_MIN_ANSWERS = 40  # answers on each side of a cut before calling its 429s noise
_NOISE_DRIFT = 0.05  # the noise share moves this far towards the measured share a second


@dataclass(slots=True)
class _Trial:
    started: float
    before_answers: int
    before_limited: int
    prior_rate: float | None
    prior_peak: float | None
    prior_origin: float
    probing: bool  # cut above where congestion was proven before: congestion is likely
    answers: int = 0
    limited: int = 0
    unsure_from: float | None = None  # the pace a cut that measured little came from
    looked: bool = False  # the early verdict was tried (only one: each look is a new chance)


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
        self._episode: _Trial | None = None  # the first unproven cut of a run of them
        self._proven_peak: float | None = None  # the rate served when congestion was proven
        self._peak: float | None = None  # where congestion was met (CUBIC's W_max)
        self._origin = 0.0  # when the growth curve started
        self._last_cut = float("-inf")

    @property
    def trial_running(self) -> bool:
        return self._trial is not None

    def served_rps(self, now: float) -> float:
        """Successes per second over the last ``SERVED_S`` seconds, or since the last cut when
        that is at least a second ago."""
        while self._served and self._served[0] < now - SERVED_S:
            self._served.popleft()
        if self._first_success is None:
            return 0.0
        start = max(now - SERVED_S, self._first_success)
        if now - self._last_cut >= 1.0:
            start = max(start, self._last_cut)
        served = sum(1 for when in self._served if when >= start)
        # A short span may include a burst the server allowed (then the cut is too shallow
        # and the next trial cuts deeper); a longer floor would understate a fast server.
        return served / max(now - start, MIN_SPAN_S)

    def record(
        self, now: float, epoch: int, *, limited: bool, pacing: Callable[[], float | None]
    ) -> bool:
        """One answer (a success or a 429) to a request sent in ``epoch``; True if the rate
        changed. ``pacing`` tells the request rate in force now (None: unpaced)."""
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
            return self._cut(now, pacing())
        return False

    def refused_in_trial(self) -> bool:
        """A trial is running and its cut is plainly too shallow so far."""
        trial = self._trial
        return trial is not None and trial.limited >= 4 and trial.limited >= SHALLOW * trial.answers

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
        t = now - self._origin - PLATEAU_S
        # Concave up to the old peak, convex past it: gentle where the limit was, quick to
        # find one that was raised.
        scale = (1 - CUT_SHARE) / PLATEAU_S**3 if t < 0 else 1 / DOUBLING_S**3
        self.rate_rps = max(self.rate_rps, self._peak * (1 + scale * t**3))
        if self.noise_share and len(self._recent) >= 100 and not self._suspect():
            # Noise drifts: follow it while no congestion is suspected.
            share = self._recent_limited / len(self._recent)
            self.noise_share += (share - self.noise_share) * _NOISE_DRIFT

    def release(self) -> None:
        """The discovered rate climbed past every other limit: forget it."""
        if self._trial is None:
            self.rate_rps = self._peak = None

    def _forget(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RECENT_S:
            self._recent_limited -= self._recent.popleft()[1]

    def _suspect(self) -> bool:
        return self.suspicious(self._recent_limited, len(self._recent))

    def suspicious(self, limited: int, answers: int) -> bool:
        """Whether ``limited`` 429s among ``answers`` are significantly above the noise."""
        if limited < 3 or answers < 10:
            return False
        expected = max(self.noise_share, MIN_SHARE)
        z = (limited / answers - expected) / math.sqrt(expected * (1 - expected) / answers)
        return z > Z_SUSPECT

    def _cut(self, now: float, pacing_rps: float | None) -> bool:
        served = self.served_rps(now)
        unsure_from = None
        if pacing_rps is not None and self._recent:
            # Paced, the server takes what is sent now less the share of 429s in the last
            # answers: a count over seconds would include a burst the server allowed, or the
            # slower pace of a moment ago.
            last = list(self._recent)[-LAST_ANSWERS:]
            sending = pacing_rps
            if len(last) >= 10 and last[-1][0] > last[0][0]:
                sending = min(sending, (len(last) - 1) / (last[-1][0] - last[0][0]))
            served = sending * (1 - sum(limited for _, limited in last) / len(last))
            if sending < UNSURE_SHARE * pacing_rps:
                unsure_from = pacing_rps  # answers lag a pace that just rose, or pauses
        if served <= 0:
            return False  # nothing served yet to aim under: the Retry-After pauses cover it
        target = CUT_SHARE * served
        if pacing_rps is not None:
            if target <= FLOOR * pacing_rps:
                unsure_from = pacing_rps  # a drained burst looks like a slow server
            target = min(max(target, FLOOR * pacing_rps), CUT_SHARE * pacing_rps)
        elif self._recent:
            # Unpaced: never below a share of what was being sent (answers of any kind).
            span = max(now - self._recent[0][0], MIN_SPAN_S)
            target = max(target, FLOOR * len(self._recent) / span)
        # The 429 that raised the suspicion is left out of the share before the cut: a sample
        # that stops at its own high point overstates the share, and every noise trial would
        # then seem to show a fall.
        self._trial = _Trial(
            now,
            len(self._recent) - 1,
            self._recent_limited - 1,
            self.rate_rps,
            self._peak,
            self._origin,
            # Above the rate a proven cut set, congestion is the likely cause.
            self._proven_peak is not None and (pacing_rps or 0.0) > CUT_SHARE * self._proven_peak,
        )
        self._trial.unsure_from = unsure_from
        self.rate_rps = target
        self._last_cut = now
        self.lowest_rps = target if self.lowest_rps is None else min(self.lowest_rps, target)
        self._new_epoch()
        return True

    def _judge(self, now: float, trial: _Trial) -> bool:
        before = trial.before_limited / trial.before_answers
        after = trial.limited / trial.answers
        pooled = (trial.before_limited + trial.limited) / (trial.before_answers + trial.answers)
        spread = math.sqrt(
            max(pooled * (1 - pooled), 1e-9) * (1 / trial.before_answers + 1 / trial.answers)
        )
        z = (before - after) / spread
        if (
            trial.limited >= 4
            and trial.answers >= 10
            and (after >= max(before, SHALLOW) or z < -Z_FELL)
        ):
            # More 429s than before the cut: too shallow, the next cut goes on at once (a cut
            # too deep costs a little rate; one too shallow costs 429s every second it lasts).
            self._settle(now, proven=False)
            return False
        # Enough answers that, were nothing changed, about four 429s would be among them.
        needed = max(TRIAL_MIN_ANSWERS, math.ceil(TRIAL_EXPECTED / max(before, MIN_SHARE)))
        if now - trial.started < TRIAL_MIN_S or trial.answers < needed:
            return False
        final = trial.answers >= max(NOISE_MIN_ANSWERS, trial.before_answers)
        if trial.looked and not final:
            return False  # two looks, not one per answer: each is a chance to be fooled
        trial.looked = True
        if z > (Z_FELL_PROBING if trial.probing else Z_FELL):
            self._settle(now, proven=True)  # the share fell with the rate: congestion
            return False
        if not final:
            return False
        # The share did not move with the rate: noise, as far as anyone can tell. Undo the
        # episode's cuts and remember the share after the cut (the one before was picked at a
        # high point by the suspicion), so later suspicions are judged against it.
        self.noise_share = min(max(self.noise_share, after), NOISE_MAX)
        prior = self._episode or trial
        self.rate_rps, self._peak = prior.prior_rate, prior.prior_peak
        self._origin = prior.prior_origin + (now - prior.started)
        self._trial = self._episode = None
        self.noise_verdicts += 1
        self._new_epoch()
        return True

    def _settle(self, now: float, *, proven: bool) -> None:
        """Keep the cut; the rate grows back from it on the curve."""
        assert self.rate_rps is not None
        if proven:
            self.cuts += 1
            self._episode = None
            self._proven_peak = self.rate_rps / CUT_SHARE
        elif self._episode is None:
            self._episode = self._trial  # noise could still explain it: remember where it began
        self._peak = self.rate_rps / CUT_SHARE
        trial = self._trial
        if trial is not None and trial.unsure_from is not None:
            # The cut measured little of the server: the limit lies between it and the pace
            # known too fast, so the curve climbs towards the middle of the two instead of
            # creeping up from the cut.
            self._peak = math.sqrt(self._peak * trial.unsure_from)
        self._origin = now
        self._trial = None

    def forget_recent(self) -> None:
        """Answers so far were to requests paced otherwise: judge only what comes next."""
        if self._trial is None:
            self._new_epoch()

    def _new_epoch(self) -> None:
        self.epoch += 1
        self._recent.clear()
        self._recent_limited = 0
