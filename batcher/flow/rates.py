"""The rates in force: each budget paced at the lowest of what is known about it.

Three sources: the job's ``limits`` (a ceiling the user sets), the server's rate-limit headers
(the limit it states, used at ``HEADER_SHARE``) and discovery (the request rate the server was
seen to serve when congested). Token budgets become request rates through the mean cost of a
request, so the run can say which budget binds and how fast that is.
"""

from __future__ import annotations

import math

from batcher.config import LimitsConfig
from batcher.flow.discovery import Discovery
from batcher.flow.limiter import Cost, RateLimiter
from batcher.flow.server_limits import BUDGETS, ServerLimits

HEADER_SHARE = 0.98  # of a limit the server states in headers, what is used
_COST_WEIGHT = 0.05  # how fast the mean cost of a request follows the latest


class RatesInForce:
    """Sets ``pacer``'s rates from the job, the headers and ``discovery``."""

    def __init__(self, limits: LimitsConfig, pacer: RateLimiter, discovery: Discovery) -> None:
        self.pacer = pacer
        self.discovery = discovery
        self.adaptive = limits.adaptive
        self.job: dict[str, float] = {}  # budget: per second
        if limits.requests_per_minute:
            self.job["requests"] = limits.requests_per_minute / 60
        if limits.tokens_per_minute:
            self.job["tokens"] = limits.tokens_per_minute / 60
        self.headers: dict[str, float] = {}
        self.stated_cut = 1.0  # the stated request rate is paced at this share of it (room.py)
        self.header_style: str | None = None
        self._header_key: tuple[tuple[str, float], ...] = ()
        self._in_force: dict[str, tuple[float, str]] = {}  # budget: (per second, source)
        self._mean_cost: dict[str, float] = {}
        self.apply()

    def apply(self) -> None:
        """Pace every budget at the lowest rate known for it."""
        in_force: dict[str, tuple[float, str]] = {}
        for source, rates in (("job", self.job), ("headers", self.headers)):
            for budget, stated in rates.items():
                cut = self.stated_cut if source == "headers" and budget == "requests" else 1.0
                rate = stated * cut
                if budget not in in_force or rate < in_force[budget][0]:
                    in_force[budget] = (rate, source)
        found = self.discovery.rate_rps if self.adaptive else None
        if found is not None and ("requests" not in in_force or found < in_force["requests"][0]):
            in_force["requests"] = (found, "discovered")
        self._in_force = in_force
        for budget in BUDGETS:
            rate_and_source = in_force.get(budget)
            self.pacer.set_rate(budget, rate_and_source[0] if rate_and_source else None)

    def read_headers(self, limits: ServerLimits) -> bool:
        """Take the limits a reply states; True when they changed."""
        key = tuple((name, budget.per_minute) for name, budget in limits.budgets.items())
        if key == self._header_key:
            return False
        self._header_key = key
        self.header_style = limits.style
        # A little under the stated limit: an unpaced start (before any header was seen)
        # may have emptied the server's bucket, and replies arrive bunched.
        self.headers = {name: per_minute / 60 * HEADER_SHARE for name, per_minute in key}
        self.apply()
        return True

    def learn_cost(self, usage: Cost) -> None:
        """Follow the mean cost of a request in every paced budget."""
        for budget in self._in_force:
            mean = self._mean_cost.get(budget, usage.of(budget))
            self._mean_cost[budget] = mean + (usage.of(budget) - mean) * _COST_WEIGHT

    @property
    def requests_per_s(self) -> float | None:
        """The request rate in force, or None when requests are not paced."""
        found = self._in_force.get("requests")
        return found[0] if found is not None else None

    def stated_requests_per_s(self) -> float | None:
        """The lowest request rate the job or the headers state."""
        stated = [rates["requests"] for rates in (self.job, self.headers) if "requests" in rates]
        return min(stated, default=None)

    def equivalent_rps(self) -> float | None:
        """The request rate the tightest budget allows, with the mean cost of a request."""
        return min((rps for rps, _ in self._per_request(known_cost=True)), default=None)

    def binding_source(self) -> str | None:
        """Where the tightest budget's rate comes from: job, headers or discovered."""
        per_request = self._per_request(known_cost=False)
        return min(per_request)[1] if per_request else None

    def headers_interval_s(self) -> float | None:
        """The longest wait between requests a rate stated in headers makes, with the mean
        cost of a request; None when no stated rate is in force."""
        rates = [rps for rps, source in self._per_request(known_cost=True) if source == "headers"]
        return max((1 / rps if rps > 0 else math.inf for rps in rates), default=None)

    def _per_request(self, *, known_cost: bool) -> list[tuple[float, str]]:
        """Each budget's rate as requests per second; before any answer, a token budget
        counts a request as one token unless ``known_cost`` leaves it out."""
        return [
            (rate / max(self._mean_cost.get(budget, 1.0), 1e-9), source)
            if budget != "requests"
            else (rate, source)
            for budget, (rate, source) in self._in_force.items()
            if budget == "requests" or budget in self._mean_cost or not known_cost
        ]
