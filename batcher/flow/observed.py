"""What discovery sees of the server: the recent answers and the rate it served.

Pure: time comes in as arguments.
"""

from __future__ import annotations

import itertools
from collections import deque

RECENT_S = 5.0  # the 429 share is judged over answers of this many seconds
LAST_ANSWERS = 20  # the 429 share of a paced rate that triggers a cut, over these answers
SERVED_S = 3.0  # what the server serves now: successes over this span
MIN_SPAN_S = 0.25


class RecentAnswers:
    """Answers (successes and 429s) of the last ``RECENT_S`` seconds, oldest first."""

    __slots__ = ("_answers", "limited")

    def __init__(self) -> None:
        self._answers: deque[tuple[float, bool]] = deque()
        self.limited = 0

    def __len__(self) -> int:
        return len(self._answers)

    def add(self, now: float, *, limited: bool) -> None:
        self._answers.append((now, limited))
        self.limited += limited
        self.forget(now)

    def forget(self, now: float) -> None:
        while self._answers and self._answers[0][0] < now - RECENT_S:
            self.limited -= self._answers.popleft()[1]

    def clear(self) -> None:
        self._answers.clear()
        self.limited = 0

    def last_limited(self, count: int) -> tuple[int, int]:
        """(429s, answers) among the last ``count`` answers."""
        last = list(itertools.islice(reversed(self._answers), count))
        return sum(limited for _, limited in last), len(last)

    def sent_rps(self, now: float) -> float:
        """Answers of any kind a second: how fast requests were going out."""
        span = max(now - self._answers[0][0], MIN_SPAN_S) if self._answers else MIN_SPAN_S
        return len(self._answers) / span

    def since_first_limited(self) -> tuple[int, int]:
        """(429s, answers) from the first 429 on."""
        answers = list(self._answers)
        first = next((i for i, (_, limited) in enumerate(answers) if limited), len(answers))
        return self.limited, len(answers) - first

    def taken_rps(self, pacing_rps: float, *, onset: bool = False) -> tuple[float, float]:
        """(what the server takes now, how fast answers come): what is being sent (the pace,
        or the answers' own rate when slower) less the share of 429s in the last answers,
        or with ``onset`` in the answers from the first 429 on (the successes before it
        were what was left of a burst the server allowed, not its rate)."""
        last = list(self._answers)[-LAST_ANSWERS:]
        sending = pacing_rps
        if len(last) >= 10 and last[-1][0] > last[0][0]:
            sending = min(sending, (len(last) - 1) / (last[-1][0] - last[0][0]))
        limited, answers = sum(limited for _, limited in last), len(last)
        if onset and self.limited:
            limited, answers = self.since_first_limited()
            if answers > 1 and self._answers[-1][1]:
                # The sample ends on the 429 that ended the trial: a high point by construction.
                limited, answers = limited - 1, answers - 1
        return sending * (1 - limited / answers), sending


class ServedRate:
    """Successes a second over the last ``SERVED_S`` seconds."""

    __slots__ = ("_first", "_times")

    def __init__(self) -> None:
        self._times: deque[float] = deque()
        self._first: float | None = None

    def add(self, now: float) -> None:
        times = self._times
        times.append(now)
        if self._first is None:
            self._first = now
        # Trimmed here too: a run without 429s never asks rps(), and would keep every time.
        while times[0] < now - SERVED_S:
            times.popleft()

    def rps(self, now: float, since: float) -> float:
        """Over the last seconds, or since ``since`` (the last cut) when a second ago or more."""
        while self._times and self._times[0] < now - SERVED_S:
            self._times.popleft()
        if self._first is None:
            return 0.0
        start = max(now - SERVED_S, self._first)
        if now - since >= 1.0:
            start = max(start, since)
        served = sum(1 for when in self._times if when >= start)
        # A short span may include a burst the server allowed (then the cut is too shallow
        # and the next trial cuts deeper); a longer floor would understate a fast server.
        return served / max(now - start, MIN_SPAN_S)
