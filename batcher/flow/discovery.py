"""Discovery: find a server's request rate from its 429s when nobody states it, and follow it.

Congestion and noise look alike one 429 at a time; they differ in how the 429 share answers a
change of rate. So every suspected congestion is a trial:

1. **Suspicion**: among the answers of the last ``RECENT_S`` seconds, 429s are significantly
   more than the noise share measured so far (a one-sided z-test, at least three of them);
   while no noise is measured, among the last ``SUSPECT_ANSWERS`` answers too.
2. **Cut**: the rate goes just under what the server was seen to serve (``CUT_SHARE`` of the
   successes per second over the last seconds), never below ``FLOOR`` of the rate before.
   Answers to requests sent before the cut are old news and are not counted. A cut whose
   429s stay as thick (the server's opening burst made the last answers look better than the
   server is) is followed at once by a deeper one, aimed on the answers since its first 429.
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
from collections.abc import Callable
from dataclasses import dataclass

from batcher.flow.observed import RecentAnswers, ServedRate

CUT_SHARE = 0.9  # a cut aims under the rate the server was seen to serve
FLOOR = 0.25  # one cut never goes below this share of the rate before it
UNSURE_SHARE = 0.75  # answers slower than this share of the pace measure the pace, not the server
PLATEAU_S = 15.0  # CUBIC's K: seconds to climb back to the rate where congestion was met
DOUBLING_S = 40.0  # beyond that rate, seconds until the probe reaches twice it
SUSPECT_ANSWERS = 40  # with no noise measured, 429s among this many answers suspected too
MIN_SHARE = 0.01  # the noise share assumed before any is measured
Z_SUSPECT = 3.5  # how far above the noise share the recent 429 share must be
Z_ROSE = 1.5  # a share this significantly higher after a cut is no sign of noise
Z_FELL = 3.0  # how significantly the share must fall after a cut to call it congestion
Z_FELL_PROBING = 1.0  # the same, when the cut came above a rate already proven too fast
TRIAL_MIN_S = 1.0
TRIAL_MIN_ANSWERS = 20
TRIAL_MAX_ANSWERS = 100  # ... but no more (a cut too shallow leaks 429s all the while)
TRIAL_EXPECTED = 4  # a trial lasts until this many 429s would be in it, were nothing changed
SHALLOW = 0.25  # a share at least this high and no lower than before the cut: cut deeper
SHALLOW_LIMITED, SHALLOW_ANSWERS = 4, 6  # ... once this many 429s among this many answers
DEEPER_SHARE = 0.5  # ... when at least this share of the answers since its first 429 were
DEEPER_MAX = 2  # cuts in a row made at once for that; then a new suspicion is needed
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
    depth: int = 0  # cuts in a row that each came because the one before was too shallow
    looked: bool = False  # the early verdict was tried (only one: each look is a new chance)

    def fall(self) -> tuple[float, float, float]:
        """The 429 share before and after the cut, and how significant its fall is (a
        two-proportion z-test; negative when it rose)."""
        before = self.before_limited / self.before_answers
        after = self.limited / self.answers
        pooled = (self.before_limited + self.limited) / (self.before_answers + self.answers)
        spread = math.sqrt(
            max(pooled * (1 - pooled), 1e-9) * (1 / self.before_answers + 1 / self.answers)
        )
        return before, after, (before - after) / spread


@dataclass(slots=True)
class _Curve:
    """CUBIC's growth (RFC 8312): back to ``peak`` in ``PLATEAU_S``, then doubling it in about
    ``DOUBLING_S`` more; concave where the limit was met, convex past it, so a stable limit is
    probed gently and a raised one found quickly."""

    peak: float | None = None  # where congestion was met (CUBIC's W_max)
    origin: float = 0.0  # when the curve started

    def rate(self, now: float) -> float | None:
        if self.peak is None:
            return None
        t = now - self.origin - PLATEAU_S
        scale = (1 - CUT_SHARE) / PLATEAU_S**3 if t < 0 else 1 / DOUBLING_S**3
        return self.peak * (1 + scale * t**3)


class Discovery:
    """The discovered request rate (``rate_rps``, None while no limit is known)."""

    def __init__(self) -> None:
        self.rate_rps: float | None = None
        self.noise_share = 0.0
        self.epoch = 0  # bumped at every change of rate that makes earlier answers stale
        self.cuts = 0
        self.noise_verdicts = 0
        self.lowest_rps: float | None = None
        self._recent = RecentAnswers()  # of the current epoch
        self._served = ServedRate()
        self._trial: _Trial | None = None
        self._episode: _Trial | None = None  # the first unproven cut of a run of them
        self._proven_peak: float | None = None  # the rate served when congestion was proven
        self._curve = _Curve()
        self._last_cut = float("-inf")

    @property
    def trial_running(self) -> bool:
        return self._trial is not None

    def record(
        self, now: float, epoch: int, *, limited: bool, pacing: Callable[[], float | None]
    ) -> bool:
        """One answer (a success or a 429) to a request sent in ``epoch``; True if the rate
        changed. ``pacing`` tells the request rate in force now (None: unpaced)."""
        if not limited:
            self._served.add(now)
        if epoch != self.epoch:
            return False
        self._recent.add(now, limited=limited)
        trial = self._trial
        if trial is not None:
            trial.answers += 1
            trial.limited += limited
            return self._judge(now, trial, pacing)
        if limited and self._suspect():
            return self._cut(now, pacing())
        return False

    def refused_in_trial(self) -> bool:
        """A trial is running and its cut is plainly too shallow so far."""
        trial = self._trial
        return trial is not None and trial.limited >= 4 and trial.limited >= SHALLOW * trial.answers

    def suspects(self, now: float) -> bool:
        """The recent 429 share is above the noise: a 429 now is likely congestion."""
        self._recent.forget(now)
        return self._suspect()

    def grow(self, now: float, elapsed_s: float, *, pace_binds: bool) -> None:
        """Move along the growth curve (called about once a second)."""
        if not pace_binds:
            self._curve.origin += elapsed_s  # an unused rate proves nothing: hold the curve
        curve = self._curve.rate(now)
        if self._trial is not None or curve is None or self.rate_rps is None:
            return
        self.rate_rps = max(self.rate_rps, curve)
        if self.noise_share and len(self._recent) >= 100 and not self._suspect():
            # Noise drifts: follow it while no congestion is suspected.
            share = self._recent.limited / len(self._recent)
            self.noise_share += (share - self.noise_share) * _NOISE_DRIFT

    def release(self) -> None:
        """The discovered rate climbed past every other limit: forget it."""
        if self._trial is None:
            self.rate_rps = self._curve.peak = None

    def _suspect(self) -> bool:
        # Over the last seconds; and, while no noise is measured, over the last answers alone:
        # a rate just past the limit shows as a few 429s that seconds of answers would dilute
        # (each one more is a 429 paid before the cut). Once noise is known, telling it apart
        # takes the longer sample.
        recent = self._recent
        if self.suspicious(recent.limited, len(recent)):
            return True
        return not self.noise_share and self.suspicious(*recent.last_limited(SUSPECT_ANSWERS))

    def suspicious(self, limited: int, answers: int) -> bool:
        """Whether ``limited`` 429s among ``answers`` are significantly above the noise."""
        if limited < 3 or answers < 10:
            return False
        expected = max(self.noise_share, MIN_SHARE)
        z = (limited / answers - expected) / math.sqrt(expected * (1 - expected) / answers)
        return z > Z_SUSPECT

    def _cut(self, now: float, pacing_rps: float | None, shallow: _Trial | None = None) -> bool:
        served = self._served.rps(now, since=self._last_cut)
        # Once a cut proved too shallow, the 429 share counts from the first 429 on: what
        # came before was what was left of a burst the server allowed.
        aim = _aim(now, served, pacing_rps, self._recent, onset=shallow is not None)
        if aim is None:
            return False  # nothing served yet to aim under: the Retry-After pauses cover it
        target, unsure_from = aim
        # The 429 that raised the suspicion is left out of the share before the cut: a sample
        # that stops at its own high point overstates the share, and every noise trial would
        # then seem to show a fall. A cut deeper than one found too shallow counts that one's
        # trial too (and what it counted): the pace was cut in steps, the share before is theirs.
        answers, limited = len(self._recent) - 1, self._recent.limited - 1
        if shallow is not None and shallow.depth:
            answers, limited = answers + shallow.before_answers, limited + shallow.before_limited
        self._trial = _Trial(
            now,
            answers,
            limited,
            self.rate_rps,
            self._curve.peak,
            self._curve.origin,
            # Above the rate a proven cut set, congestion is the likely cause.
            self._proven_peak is not None and (pacing_rps or 0.0) > CUT_SHARE * self._proven_peak,
        )
        self._trial.unsure_from = unsure_from
        self._trial.depth = 0 if shallow is None else shallow.depth + 1
        self.rate_rps = target
        self._last_cut = now
        self.lowest_rps = target if self.lowest_rps is None else min(self.lowest_rps, target)
        self._new_epoch()
        return True

    def _judge(self, now: float, trial: _Trial, pacing: Callable[[], float | None]) -> bool:
        before, after, z = trial.fall()
        if (
            trial.limited >= SHALLOW_LIMITED
            and trial.answers >= SHALLOW_ANSWERS
            and (after >= max(before, SHALLOW) or z < -Z_FELL)
        ):
            # More 429s than before the cut: too shallow, and the next cut goes now, aimed on
            # answers all paced at this one (a cut too deep costs a little rate for a while;
            # one too shallow costs 429s every moment it lasts). A few in a row at most: a
            # share that stays high however deep the cuts is noise that a new suspicion, judged
            # against the noise, must tell apart.
            self._settle(now, proven=False)
            limited, answers = self._recent.since_first_limited()
            at_once = trial.depth < DEEPER_MAX and 0 < limited >= DEEPER_SHARE * answers
            return at_once and self._cut(now, pacing(), shallow=trial)
        # Enough answers that, were nothing changed, about four 429s would be among them.
        needed = max(TRIAL_MIN_ANSWERS, math.ceil(TRIAL_EXPECTED / max(before, MIN_SHARE)))
        needed = min(needed, TRIAL_MAX_ANSWERS)
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
        if z < -Z_ROSE:
            # The share rose after the cut: a cut too shallow (the sample before it held the
            # last of a burst the server allowed), not noise. Kept; the next suspicion cuts on.
            self._settle(now, proven=False)
            return False
        # The share did not move with the rate: noise, as far as anyone can tell. Undo the
        # episode's cuts and remember the share after the cut (the one before was picked at a
        # high point by the suspicion), so later suspicions are judged against it.
        self.noise_share = min(max(self.noise_share, after), NOISE_MAX)
        prior = self._episode or trial
        self.rate_rps = prior.prior_rate
        self._curve = _Curve(prior.prior_peak, prior.prior_origin + (now - prior.started))
        self._trial = self._episode = None
        self.noise_verdicts += 1
        self._new_epoch()
        return True

    def _settle(self, now: float, *, proven: bool) -> None:
        """Keep the cut; the rate grows back from it on the curve."""
        assert self.rate_rps is not None
        trial = self._trial
        if proven:
            self.cuts += 1
            self._episode = None
            self._proven_peak = self.rate_rps / CUT_SHARE
            if trial is not None:
                # Under the limit, what 429s are left is the noise: a noise share learned
                # from a congestion mistaken for noise must not hide the next congestion.
                self.noise_share = min(self.noise_share, trial.limited / trial.answers)
        elif self._episode is None:
            self._episode = self._trial  # noise could still explain it: remember where it began
        peak = self.rate_rps / CUT_SHARE
        if trial is not None and trial.unsure_from is not None:
            # The cut measured little of the server: the limit lies between it and the pace
            # known too fast, so the curve climbs towards the middle of the two instead of
            # creeping up from the cut.
            peak = math.sqrt(peak * trial.unsure_from)
        self._curve = _Curve(peak, now)
        self._trial = None

    def forget_recent(self) -> None:
        """Answers so far were to requests paced otherwise: judge only what comes next."""
        if self._trial is None:
            self._new_epoch()

    def _new_epoch(self) -> None:
        self.epoch += 1
        self._recent.clear()


def _aim(
    now: float, served: float, pacing_rps: float | None, recent: RecentAnswers, *, onset: bool
) -> tuple[float, float | None] | None:
    """Where a cut goes: just under what the server serves, within bounds of the pace; and the
    pace it came from when the cut measured little of the server (else None)."""
    unsure_from = None
    if pacing_rps is not None and recent:
        # Paced, the server takes what is sent now less the share of 429s in the last
        # answers: a count over seconds would include a burst the server allowed, or the
        # slower pace of a moment ago.
        served, sending = recent.taken_rps(pacing_rps, onset=onset)
        if sending < UNSURE_SHARE * pacing_rps:
            unsure_from = pacing_rps  # answers lag a pace that just rose, or pauses
    if served <= 0:
        return None
    target = CUT_SHARE * served
    if pacing_rps is not None:
        if target <= FLOOR * pacing_rps:
            unsure_from = pacing_rps  # a drained burst looks like a slow server
        target = min(max(target, FLOOR * pacing_rps), CUT_SHARE * pacing_rps)
    elif recent:
        # Unpaced: never below a share of what was being sent (answers of any kind).
        target = max(target, FLOOR * recent.sent_rps(now))
    return target, unsure_from
