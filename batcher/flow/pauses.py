"""When a 429 holds every request, and when the server has stalled the run: it refused
everything for ``stall_timeout_s``, or asked for a wait longer than that."""

from __future__ import annotations

from collections import deque

from batcher.flow.discovery import Discovery
from batcher.flow.server_limits import MAX_WAIT_S

SUSPECTED_PAUSE_S = 1.0  # the longest everyone waits on a 429 when congestion is suspected
_REFUSING_WINDOW = 20  # answers the "server refuses nearly everything" share is judged on


class PausePolicy:
    """Follows the answers: what share are 429s, and how long since the last success."""

    def __init__(
        self, discovery: Discovery, *, adaptive: bool, stall_timeout_s: float, now: float
    ) -> None:
        self.discovery = discovery
        self.adaptive = adaptive
        self.stall_timeout_s = stall_timeout_s
        self._recent: deque[bool] = deque(maxlen=_REFUSING_WINDOW)
        self._last_progress = now
        self._limited_since_progress = 0
        self._too_long: str | None = None  # the first wait asked that was a stall

    def answered(self, now: float) -> None:
        self._recent.append(False)
        self._last_progress = now
        self._limited_since_progress = 0

    def progressed(self, now: float) -> None:
        """An answer that was neither a success nor a 429 (the server is alive)."""
        self._last_progress = now
        self._limited_since_progress = 0

    def refused(self) -> None:
        self._recent.append(True)
        self._limited_since_progress += 1

    def everyone_waits(self, now: float, retry_after_s: float) -> float:
        """How long a 429 holds every request: its Retry-After when it speaks for everyone,
        at most ``SUSPECTED_PAUSE_S`` when congestion is only suspected, else nothing."""
        if not self.adaptive:
            return retry_after_s  # adaptive: false keeps the plain rule: every 429 pauses all
        refused, answers = sum(self._recent), len(self._recent)
        if answers >= 10 and refused > answers / 2:
            return retry_after_s  # the server refuses nearly everything: a wall, not noise
        if self.discovery.trial_running:
            # The cut is the answer to what was suspected; pausing too would slow the trial
            # and, were the 429s noise, the run. Only a plainly too shallow cut pauses.
            suspected = self.discovery.refused_in_trial()
        else:
            suspected = self.discovery.suspicious(refused, answers) or self.discovery.suspects(now)
        # A long Retry-After on a suspicion would idle a server that refills continuously;
        # the 429's own request still waits all of it.
        return min(retry_after_s, SUSPECTED_PAUSE_S) if suspected else 0.0

    def stalled(self, now: float) -> bool:
        """Nothing but 429s for ``stall_timeout_s``."""
        quiet = now - self._last_progress
        return self._limited_since_progress > 0 and quiet >= self.stall_timeout_s

    def asked(self, seconds: float, what: str) -> None:
        """The server asked for a wait (``what`` says how): one longer than ``stall_timeout_s``
        stalls the run now, rather than after sitting through it."""
        if seconds > self.stall_timeout_s and self._too_long is None:
            more = " or more" if seconds >= MAX_WAIT_S else ""
            self._too_long = (
                f"the server asked to wait {seconds:,.0f} s{more} ({what}), longer than "
                f"limits.stall_timeout_s={self.stall_timeout_s:g} s"
            )

    def stall(self, now: float) -> str | None:
        """Why the run has stalled, or None while it has not."""
        if self._too_long is not None:
            return self._too_long
        if self.stalled(now):
            return (
                "the server answered nothing but 429 (rate limited) for "
                f"limits.stall_timeout_s={self.stall_timeout_s:g} s"
            )
        return None
