"""The flow controller against a third-party OpenAI-compatible test server: llmock (PyPI, MIT).

The project's own simulator (``batcher.sim``) was written with the controller in mind; llmock
was not. It runs in a background thread on a loopback port and answers
``/v1/chat/completions`` for any model, without a key. One of its behaviours is used here:
an enforced limit: a token bucket per API key that starts full (a burst of a minute's
budget), refills at ``rpm / 60`` per second, and states the limit on every reply in OpenAI's
``x-ratelimit-{limit,remaining,reset}-requests`` headers, with ``retry-after`` on its 429s.

Rates are measured from llmock's own request journal (``time.monotonic()`` in this process),
from the first request the server saw to the last answer, so the run's start-up and output
writing do not count against it.

llmock registers a pytest plugin when installed (the ``llmock`` and ``llmock_server``
fixtures); this test does not use it and starts ``LLMockServer`` itself, so
the limiter's buckets and the journal belong to one run.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from llmock.chaos import ChaosSettings
from llmock.journal import RequestRecord
from llmock.ratelimit import Admission, LimitSettings
from llmock.testing import LLMockServer

from batcher import RunSummary, run
from bench.pacing import write_job, write_rows

LATENCY_MS = 200  # llmock answers at once by default; a real server takes a while


@pytest.fixture(autouse=True)
def _no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # No key is sent to a loopback base URL without one, so every request lands in llmock's
    # bucket for the empty key, the one the "8 left" case spends.
    monkeypatch.delenv("BATCHER_API_KEY", raising=False)


def _run(folder: Path, server: LLMockServer, rows: int, limits: dict[str, int]) -> RunSummary:
    write_rows(rows, folder)
    job = write_job(folder, server.base_url("openai"), limits)
    summary = run(job, quiet=True, fresh=True)
    out = pl.read_parquet(folder / "out.parquet")
    assert out.height == rows
    assert out["error"].null_count() == rows, out.filter(pl.col("error").is_not_null())["error"]
    return summary


def _journal(server: LLMockServer) -> list[RequestRecord]:
    return server.state.journal.records(wait=2.0)


def _per_minute(answers: int, seconds: float) -> float:
    return answers / max(seconds, 1e-9) * 60


def _spend_all_but(server: LLMockServer, left: int) -> None:
    """When the run's first request reaches the limiter, another client of the same key has
    already taken all but ``left`` requests of the bucket (llmock's public ``admit``, whose
    answer tells what remains; requests are charged when their latency is over)."""
    limiter = server.state.limiter
    admit = limiter.admit
    spent = False

    def first_finds_it_spent(provider: str, key: str, tokens: int) -> Admission:
        nonlocal spent
        if not spent:
            spent = True
            while True:
                taken = admit(provider, key, 0)
                assert taken.requests is not None
                if not taken.allowed or taken.requests.remaining <= left:
                    break
        return admit(provider, key, tokens)

    limiter.admit = first_finds_it_spent  # type: ignore[method-assign]


@pytest.mark.slow
def test_rate_stated_in_headers_is_found_and_kept(tmp_path: Path) -> None:
    """llmock enforces 1,200 requests/min and says so in OpenAI-style headers; the job states no
    rate, and the key's bucket is nearly spent when the run starts (another job on the same
    key, or a rerun right after a run), so the first requests sent before any reply are partly
    refused (8 pass, the rest get 429 with the limit in their headers). Every row is answered,
    the stated limit is read from the headers, few requests are refused, and the pace after
    the start (answers from 3 s after the first request on, 60 requests' worth of the limit,
    past the requests sent unpaced before the first reply came back) is the stated limit from
    both sides: at least 85 % of it, not below it, and at most 110 %, as the controller paces
    at the stated limit and never rides a burst (README, "How it behaves"). The pacing cases
    themselves run on virtual time in test_pacing.py; this one checks a server batcher was
    not written against."""
    rows, rpm = 150, 1200  # 7.5 s at the limit
    with LLMockServer(chaos=ChaosSettings(latency_ms=LATENCY_MS)) as server:
        server.state.limiter.configure(LimitSettings(rpm=rpm))
        _spend_all_but(server, 8)
        summary = _run(tmp_path, server, rows, {})
        records = _journal(server)

    assert summary.exit_code == 0
    assert summary.rows_ok == rows
    assert summary.rows_failed == 0
    flow = summary.flow
    assert flow is not None
    assert flow.job == {}
    assert flow.headers.get("requests") == pytest.approx(rpm), flow
    assert flow.header_style == "openai"

    limited = [r for r in records if r.status == 429]
    answered = sorted(r.ended_at for r in records if r.status == 200)
    assert len(answered) == rows
    assert limited, "llmock refused nothing: the test proves nothing"
    share = len(limited) / len(records)
    assert share <= 0.08, f"{len(limited)} 429s of {len(records)} requests; {flow}"

    first = min(r.started_at for r in records)
    steady_from = first + 3.0
    steady = [when for when in answered if when >= steady_from]
    achieved = _per_minute(len(steady), answered[-1] - steady_from)
    assert 0.85 * rpm <= achieved <= 1.10 * rpm, f"{achieved:.0f}/min after the start; {flow}"
