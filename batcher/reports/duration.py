"""How long a job takes live: the slowest of the bounds known on its pace.

Each bound is the time one limit alone allows: the job's ``limits.requests_per_minute`` and
``limits.tokens_per_minute`` (tokens per request as estimated, or as a sample used them),
the limits a sample's replies stated in headers (at the share the run paces them at), the
rate a sample served once it met 429s (it ran into a limit), and latency x concurrency. The
slowest decides, and says so. With no rate limit known, latency x concurrency is all there
is: a server's unstated limit can only make the run slower, so the figure is a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from batcher.config import LimitsConfig
from batcher.flow.rates import HEADER_SHARE

_UNITS = {
    "requests": "requests",
    "tokens": "tokens",
    "input_tokens": "input tokens",
    "output_tokens": "output tokens",
}


@dataclass(frozen=True, slots=True)
class Workload:
    """What the job asks of a server: requests, each one's tokens, and its latency."""

    requests: int
    tokens_per_request: float  # prompt + completion, as limits.tokens_per_minute counts them
    input_tokens_per_request: float
    output_tokens_per_request: float
    latency_s: float
    latency_measured: bool = False  # False: assumed, no request measured it

    @classmethod
    def of_rows(
        cls,
        rows: int,
        tokens_per_row: tuple[float, float],
        requests_per_row: int,
        latency_s: float,
        *,
        latency_measured: bool = False,
    ) -> Workload:
        """``rows`` rows of ``(prompt, completion)`` tokens each, ``requests_per_row`` requests
        each (fan-out splits a row's tokens between its requests)."""
        prompt, completion = tokens_per_row
        per_row = max(requests_per_row, 1)
        return cls(
            rows * per_row,
            (prompt + completion) / per_row,
            prompt / per_row,
            completion / per_row,
            latency_s,
            latency_measured,
        )

    def of(self, budget: str) -> float:
        """This workload's total in one budget (requests, tokens, input or output tokens)."""
        per_request = {
            "requests": 1.0,
            "tokens": self.tokens_per_request,
            "input_tokens": self.input_tokens_per_request,
            "output_tokens": self.output_tokens_per_request,
        }[budget]
        return self.requests * per_request


@dataclass(frozen=True, slots=True)
class SamplePace:
    """What a sample met: the limits its replies stated, per minute by budget, and the
    requests a second the server served it when it refused some (429s)."""

    stated_per_minute: dict[str, float] = field(default_factory=dict)
    rate_limited: int = 0
    served_per_s: float | None = None


@dataclass(frozen=True, slots=True)
class Duration:
    """A predicted duration and what decided it."""

    seconds: float
    # What decided it: limits.requests_per_minute, limits.tokens_per_minute, server (a limit
    # its headers stated), sample (the rate a sample met with 429s) or concurrency.
    bound: str
    pace: str  # "at 600 requests/min (limits.requests_per_minute)", or latency x places
    rate_known: bool  # False: no rate limit is known and ``seconds`` is a lower bound

    def describe(self) -> str:
        if not self.rate_known:
            return f"at least {format_seconds(self.seconds)} {self.pace}, no rate limit known"
        return f"~{format_seconds(self.seconds)} {self.pace}"


def format_seconds(seconds: float) -> str:
    """``45 s``, ``3 min 20 s``, ``2 h 5 min``."""
    whole = round(seconds)
    if whole < 60:
        return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.1f} s"
    if whole < 3600:
        minutes, rest = divmod(whole, 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, rest = divmod(round(seconds / 60), 60)
    return f"{hours} h {rest} min" if rest else f"{hours} h"


def predict_duration(
    limits: LimitsConfig, work: Workload, sample: SamplePace | None = None
) -> Duration:
    """The slowest of the bounds ``limits``, ``work`` and ``sample`` put on the run."""
    latency = f"{'' if work.latency_measured else 'an assumed '}{work.latency_s:.2g} s a request"
    bounds = [
        Duration(
            work.requests * work.latency_s / limits.connections,
            "concurrency",
            f"({limits.connections} in flight × {latency}: latency × concurrency)",
            rate_known=False,
        )
    ]
    for budget, per_minute in (
        ("requests", limits.requests_per_minute),
        ("tokens", limits.tokens_per_minute),
    ):
        if per_minute:
            name = f"limits.{budget}_per_minute"
            bounds.append(_at_rate(work, budget, per_minute, name, name))
    if sample is not None:
        for budget, per_minute in sample.stated_per_minute.items():
            # The run paces a stated limit a little under it (flow/rates.py).
            paced = per_minute * HEADER_SHARE
            said = f"{HEADER_SHARE:.0%} of the {per_minute:,.0f} stated by the server"
            bounds.append(_at_rate(work, budget, paced, "server", said))
        if sample.rate_limited and sample.served_per_s:
            refused = f"{sample.rate_limited} 429{'s' if sample.rate_limited > 1 else ''}"
            met = f"the rate the sample met, with {refused}"
            bounds.append(_at_rate(work, "requests", sample.served_per_s * 60, "sample", met))
    slowest = max(bounds, key=lambda bound: bound.seconds)
    known = any(bound.rate_known for bound in bounds)
    return Duration(slowest.seconds, slowest.bound, slowest.pace, known)


def _at_rate(work: Workload, budget: str, per_minute: float, bound: str, source: str) -> Duration:
    return Duration(
        work.of(budget) / (per_minute / 60),
        bound,
        f"at {per_minute:,.0f} {_UNITS[budget]}/min ({source})",
        rate_known=True,
    )
