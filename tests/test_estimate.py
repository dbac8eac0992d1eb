"""`batcher estimate`'s duration: the slowest of the limits known bounds it, and it says which.

Issue 22: a 2,000-row job against a server serving 600 requests a minute was estimated at
8 s (7 s with --sample 50) and took 205 s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batcher.cli import main
from batcher.config import LimitsConfig
from batcher.reports.duration import SamplePace, Workload, format_seconds, predict_duration
from tests.conftest import SimFactory, reviews, write_job

ROWS = 2000
NOWHERE = "http://127.0.0.1:9/v1"  # estimate without --sample sends nothing


def _estimate(
    job: Path, capsys: pytest.CaptureFixture[str], *flags: str
) -> tuple[dict[str, Any], str]:
    """The estimate's JSON and its printed lines."""
    assert main(["estimate", str(job), "--json", *flags]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert main(["estimate", str(job), *flags]) == 0
    return figures, capsys.readouterr().out


def test_requests_per_minute_bounds_the_duration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(
        tmp_path,
        NOWHERE,
        data=reviews(ROWS),
        limits={"concurrency": "auto", "requests_per_minute": 600},
    )
    figures, text = _estimate(job, capsys)
    assert figures["duration_s"] == pytest.approx(200, rel=0.1)
    assert figures["duration_bound"] == "limits.requests_per_minute"
    assert figures["duration_at_least"] is False
    assert "~3 min 20 s at 600 requests/min (limits.requests_per_minute)" in text


def test_tokens_per_minute_bounds_the_duration_when_slower(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 6,000 requests a minute allow 20 s; 60,000 tokens a minute, at the prompt estimate
    # plus all of max_tokens (what the limiter reserves), allow longer.
    job = write_job(
        tmp_path,
        NOWHERE,
        data=reviews(ROWS),
        limits={"concurrency": "auto", "requests_per_minute": 6000, "tokens_per_minute": 60000},
    )
    figures, text = _estimate(job, capsys)
    tokens = figures["prompt_tokens"] + figures["completion_tokens_high"]
    assert figures["duration_s"] == pytest.approx(tokens / 1000, rel=0.01)
    assert figures["duration_s"] > 20 * 1.5
    assert figures["duration_bound"] == "limits.tokens_per_minute"
    assert "at 60,000 tokens/min (limits.tokens_per_minute)" in text


def test_no_limit_known_is_a_lower_bound(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, NOWHERE, data=reviews(ROWS), limits={"concurrency": "auto"})
    figures, text = _estimate(job, capsys)
    assert figures["duration_at_least"] is True
    assert figures["duration_bound"] == "concurrency"
    assert "duration, live: at least 8 s (512 in flight × an assumed 2 s a request" in text
    assert "no rate limit known" in text


def test_sample_takes_the_limit_the_server_states(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # The job knows no limit; the server states 600 a minute in every reply's headers.
    server = sim_factory(requests_per_minute=600, latency_s=0.05, ratelimit_headers="openai")
    job = write_job(tmp_path, server.url, data=reviews(ROWS), limits={"concurrency": "auto"})
    assert main(["estimate", str(job), "--sample", "10", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["duration_bound"] == "server"
    assert figures["duration_at_least"] is False
    # Paced at 98 % of the stated limit, as the run paces it.
    assert figures["duration_s"] == pytest.approx(ROWS / 588 * 60, rel=0.01)


def test_sample_that_met_429s_is_bounded_by_the_rate_it_met(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing states the server's 1,200 a minute: the sample runs into it.
    server = sim_factory(requests_per_minute=1200, latency_s=0.05, burst_s=0.1)
    job = write_job(tmp_path, server.url, data=reviews(ROWS), limits={"concurrency": "auto"})
    assert main(["estimate", str(job), "--sample", "40", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert server.simulator.statuses["429"] > 0
    assert figures["duration_bound"] == "sample"
    assert figures["duration_at_least"] is False
    ideal = ROWS / 1200 * 60  # 100 s
    assert ideal * 0.8 <= figures["duration_s"] <= ideal * 1.6


def test_sample_without_limits_measures_latency(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory(latency_s=0.2)
    job = write_job(tmp_path, server.url, data=reviews(ROWS), limits={"concurrency": 16})
    assert main(["estimate", str(job), "--sample", "10", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["duration_at_least"] is True
    assert figures["duration_s"] == pytest.approx(ROWS * 0.2 / 16, rel=0.25)


def _work(latency_s: float = 0.0) -> Workload:
    return Workload.of_rows(ROWS, (100.0, 50.0), 1, latency_s, latency_measured=True)


def test_stated_input_and_output_token_limits_count_their_own_tokens() -> None:
    limits = LimitsConfig()
    stated = SamplePace({"requests": 100_000, "output_tokens": 10_000})
    duration = predict_duration(limits, _work(), stated)
    assert duration.bound == "server"
    assert duration.seconds == pytest.approx(ROWS * 50 / (10_000 * 0.98 / 60))
    assert "output tokens/min" in duration.describe()


def test_concurrency_binds_though_a_rate_is_known() -> None:
    limits = LimitsConfig(concurrency=4, requests_per_minute=6000)
    duration = predict_duration(limits, _work(latency_s=0.5))
    assert duration.bound == "concurrency"
    assert duration.seconds == pytest.approx(ROWS * 0.5 / 4)
    assert duration.describe() == (
        "~4 min 10 s (4 in flight × 0.5 s a request: latency × concurrency)"
    )


def test_429s_without_a_served_rate_add_no_bound() -> None:
    duration = predict_duration(LimitsConfig(), _work(0.1), SamplePace(rate_limited=3))
    assert not duration.rate_known


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0.4 s"), (45, "45 s"), (200, "3 min 20 s"), (180, "3 min"), (7500, "2 h 5 min")],
)
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text
