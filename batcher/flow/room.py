"""A request limit the server states: the target, whatever enforces it.

A server that states its request limit in headers (``x-ratelimit-*`` or
``anthropic-ratelimit-*``) is paced at it (``rates.py``), and this module places requests
within what it says is left: each reply's ``remaining``, less what was sent since, is the
room; no request goes while there is none. A 429 under a stated limit is answered by a small,
bounded cut (``StatedTuning.cut_share``), not discovery's: the limit is known, only its edge was
met (an opening burst, a window that counts differently from the pace), and the rate comes back
once 429s stop. Discovery stays for limits nobody states, and takes over from a stated limit
under which 429s keep coming (it is not the one enforced).

Measured (bench/pacing.py on virtual time, 900/min stated, enforced over 10 s windows):
discovery cut to 200/min on the one 429 of the first window's edge (the opening burst counts in
it) and held the run at 57 % of the limit; now 98 %, with a bucket 99 %. Holding everyone for a
429's Retry-After when none remain: a run that opened on a window 140 of 150 full met one 429
(12 without).
"""

from __future__ import annotations

from dataclasses import dataclass

from batcher.flow.rates import HEADER_SHARE
from batcher.flow.server_limits import ServerLimits, StatedLimit


@dataclass(frozen=True, slots=True)
class StatedTuning:
    """The numbers a stated limit is run by; each line says what it trades."""

    # After a 429, the share of the stated rate paced (the rates in force use HEADER_SHARE of
    # it otherwise): lower clears a crowded window sooner, and costs rate while it lasts.
    cut_share: float = 0.92
    # Seconds without a 429 before the stated rate is back: shorter wins rate back sooner,
    # and meets the same edge again sooner if the cause is still there.
    calm_s: float = 2.0
    # Requests kept back from what the server says remains: a request sent while its reply
    # was on the way back is not counted in it. More is safer at a window's edge, and slower.
    spare: float = 1.0
    # 429s among the answers of one episode (from a 429 until ``calm_s`` without one) that
    # say the stated limit is not what is enforced, and hand the rate to discovery for the
    # rest of the run: lower gives up on a stated limit sooner, and on one edge met more often.
    doubt_share: float = 0.1
    doubt_answers: int = 40  # ... judged once the episode has this many answers


TUNING = StatedTuning()


class StatedRoom:
    """What the server's stated request limit leaves now, and the cut a 429 under it makes."""

    __slots__ = (
        "_answers",
        "_refusals",
        "_sent_since",
        "doubted",
        "last_refused",
        "remaining",
        "reset_at",
        "tuning",
    )

    def __init__(self, tuning: StatedTuning = TUNING) -> None:
        self.tuning = tuning
        self.remaining: float | None = None  # as of the latest reply that said
        self.reset_at: float | None = None  # when that reply said the limit is whole again
        self._sent_since = 0  # requests sent since that reply
        self.last_refused: float | None = None  # the latest 429 under the stated limit
        self._answers = self._refusals = 0  # of the episode since the first of its 429s
        self.doubted = False  # 429s kept coming under the cut: the limit is not the one stated

    def read(self, limit: StatedLimit, now: float) -> None:
        """A reply's statement of the request limit."""
        if limit.remaining is None:
            return
        self.remaining, self._sent_since = limit.remaining, 0
        self.reset_at = now + limit.reset_s if limit.reset_s is not None else None

    def sent(self, now: float, interval_s: float) -> float | None:
        """One request went: how long everyone holds now (None: there is room left). With no
        room, until the limit is whole again or one request's interval at the stated rate,
        whichever is sooner: a bucket or a sliding window frees room before it is whole, and
        a request that meets a full window comes back with its Retry-After, which holds all."""
        if self.remaining is None:
            return None
        self._sent_since += 1
        if self.remaining - self._sent_since >= self.tuning.spare:
            return None
        hold = interval_s
        if self.reset_at is not None:
            hold = min(hold, max(self.reset_at - now, 0.0))
        return hold or None

    def answered(self, now: float, *, limited: bool) -> None:
        """An answer under the stated limit: a 429 starts or extends an episode of them."""
        calm = self.last_refused is None or now - self.last_refused >= self.tuning.calm_s
        if calm:
            if not limited:
                return
            self._answers = self._refusals = 0
        self._answers += 1
        self._refusals += limited
        if limited:
            self.last_refused = now
        tuning = self.tuning
        if self._answers >= tuning.doubt_answers and (
            self._refusals >= tuning.doubt_share * self._answers
        ):
            self.doubted = True

    @staticmethod
    def full(limits: ServerLimits | None) -> bool:
        """A reply says no request remains."""
        found = limits.budgets.get("requests") if limits is not None else None
        return found is not None and found.remaining is not None and found.remaining < 1

    def share(self, now: float) -> float:
        """What the stated rate in force is multiplied by now: the cut while 429s are recent
        (as a share of the ``HEADER_SHARE`` the rates use), else 1."""
        if self.last_refused is None or now - self.last_refused >= self.tuning.calm_s:
            return 1.0
        return self.tuning.cut_share / HEADER_SHARE
