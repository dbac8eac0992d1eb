"""Flow-control benchmark: achieved rate and 429 share against servers that limit differently.

    python bench/pacing.py [--rows 1200] [--case NAME ...]

Each case runs a real job over loopback against the simulator set up as named: limits stated in
the job or not, advertised in headers or not, enforced by a token bucket, a fixed or a sliding
window, with 429s that the pace causes or not, and a limit that moves mid-run. "of limit" is
the achieved answer rate over the server's limit (first to last answer).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from batcher.runs.shell import run
from batcher.sim import SimSettings, SimulatorThread

SERVER_RPM = 1200
SERVER_TPM = 36_000  # with these ~30-token requests: about 1,200 requests/minute too
RETRY = {"max_attempts": 10, "initial_backoff_s": 0.05, "max_backoff_s": 2}


def write_rows(rows: int, folder: Path) -> None:
    frame = pl.DataFrame(
        {"id": [f"r{i}" for i in range(rows)], "text": [f"row {i} " * 3 for i in range(rows)]}
    )
    frame.write_parquet(folder / "rows.parquet")


def write_job(folder: Path, url: str, limits: dict[str, Any]) -> Path:
    job = {
        "name": "pacing",
        "input": {"path": "rows.parquet", "id_column": "id"},
        "endpoint": {"base_url": url},
        "request": {"model": "claude-3-5-haiku-20241022", "prompt": "{{ text }}", "max_tokens": 30},
        "limits": limits,
        "retry": RETRY,
        "output": {"path": "out.parquet"},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def pacing_case(
    rows: int, server: dict[str, Any], limits: dict[str, Any], folder: Path
) -> dict[str, Any]:
    """Run one job against a simulator set up as ``server``; returns rate, 429 share, times."""
    write_rows(rows, folder)
    with SimulatorThread(SimSettings(**server)) as sim:
        path = write_job(folder, sim.url, limits)
        started = time.monotonic()
        summary = run(path, quiet=True, fresh=True)
        wall = time.monotonic() - started
        assert sim.simulator is not None
        stats = sim.simulator
        by_tokens = "tokens_per_minute" in server and "requests_per_minute" not in server
        achieved = stats.achieved_tps() if by_tokens else stats.achieved_rps()
        limit = (
            server.get("requests_per_minute")
            or server.get("tokens_per_minute")
            or limits.get("requests_per_minute")
        )
        return {
            "rows_ok": summary.rows_ok,
            "rows_failed": summary.rows_failed,
            "exit_code": summary.exit_code,
            "requests": stats.requests,
            "share_429": stats.statuses["429"] / max(stats.requests, 1),
            "achieved_per_min": achieved * 60,
            "limit_per_min": limit,
            "wall_s": wall,
            "answered_at": list(stats.answered_at),
            "summary": summary,
        }


def rate_over_time(answered_at: list[float], window_s: float = 5.0) -> list[tuple[float, float]]:
    """(seconds since the first answer, answers per minute over the window ending then)."""
    if not answered_at:
        return []
    first, points, low = answered_at[0], [], 0
    for high, when in enumerate(answered_at):
        while answered_at[low] < when - window_s:
            low += 1
        if when - first >= window_s:
            points.append((when - first, (high - low + 1) / window_s * 60))
    return points


def follow_time(points: list[tuple[float, float]], after_s: float, test: Any) -> float | None:
    """Seconds from ``after_s`` until the windowed rate first passes ``test``."""
    for when, rate in points:
        if when >= after_s and test(rate):
            return when - after_s
    return None


CHANGE_AT_S, RESTORE_AT_S = 30.0, 60.0
STATED_RPM = 900
STATED_ROWS = 1000

CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # today's cases: the job states the limit, or three times it
    "rpm at limit": ({"requests_per_minute": SERVER_RPM}, {"requests_per_minute": SERVER_RPM}),
    "rpm 3x adaptive": (
        {"requests_per_minute": SERVER_RPM},
        {"requests_per_minute": 3 * SERVER_RPM},
    ),
    "tpm at limit": ({"tokens_per_minute": SERVER_TPM}, {"tokens_per_minute": SERVER_TPM}),
    "tpm 3x adaptive": ({"tokens_per_minute": SERVER_TPM}, {"tokens_per_minute": 3 * SERVER_TPM}),
    # nobody states the limit
    "no rate, bucket": ({"requests_per_minute": SERVER_RPM, "latency_s": 0.2}, {}),
    "no rate, fixed window": (
        {"requests_per_minute": SERVER_RPM, "latency_s": 0.2, "limiter": "window", "window_s": 10},
        {},
    ),
    "no rate, sliding window": (
        {"requests_per_minute": SERVER_RPM, "latency_s": 0.2, "limiter": "sliding", "window_s": 10},
        {},
    ),
    "no rate, long retry-after": (
        {"requests_per_minute": SERVER_RPM, "latency_s": 0.2, "limit_retry_after_s": 5.0},
        {},
    ),
    "no rate, no retry-after": (
        {"requests_per_minute": SERVER_RPM, "latency_s": 0.2, "send_retry_after": False},
        {},
    ),
    # the server states it in headers
    "headers openai": (
        {"requests_per_minute": 900, "latency_s": 0.2, "ratelimit_headers": "openai"},
        {},
    ),
    "headers anthropic": (
        {"requests_per_minute": 900, "latency_s": 0.2, "ratelimit_headers": "anthropic"},
        {},
    ),
    # the server states 900/min in headers and enforces it by a bucket, fixed or sliding 10 s
    # windows; the job states no rate (issue 22, item 1: a stated limit is the target)
    **{
        f"stated {style}, {name}": (
            {
                "requests_per_minute": STATED_RPM,
                "latency_s": 0.05,
                "ratelimit_headers": style,
                "limiter": limiter,
                "window_s": 10,
            },
            {},
        )
        for style in ("openai", "anthropic")
        for name, limiter in (("bucket", "bucket"), ("fixed", "window"), ("sliding", "sliding"))
    },
    # 429s the pace does not cause
    "random 8% 429s": (
        {"random_429_share": 0.08, "retry_after_s": 1.0, "latency_s": 0.2},
        {"requests_per_minute": SERVER_RPM},
    ),
    "random 8% + limit": (
        {
            "random_429_share": 0.08,
            "retry_after_s": 1.0,
            "latency_s": 0.2,
            "requests_per_minute": SERVER_RPM,
        },
        {},
    ),
    # concurrency, not the rate, would bind at the old default of 32
    "2 s replies": ({"latency_s": 2.0}, {"requests_per_minute": SERVER_RPM}),
    # the limit halves at 30 s and comes back at 60 s
    "limit halved": (
        {
            "requests_per_minute": SERVER_RPM,
            "latency_s": 0.2,
            "schedule": ((CHANGE_AT_S, SERVER_RPM / 2), (RESTORE_AT_S, SERVER_RPM)),
        },
        {},
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--case", choices=list(CASES), action="append")
    arguments = parser.parse_args()
    print(
        f"{'case':26} {'ok':>5} {'fail':>4} {'requests':>8} {'429 share':>9} "
        f"{'achieved/min':>12} {'of limit':>8} {'wall s':>7}  notes"
    )
    for name in arguments.case or CASES:
        server, limits = CASES[name]
        rows = arguments.rows
        if name == "limit halved":
            rows = max(rows, int(SERVER_RPM / 60 * (RESTORE_AT_S + 40)))
        if name.startswith("stated "):
            rows = STATED_ROWS
        with tempfile.TemporaryDirectory() as folder:
            result = pacing_case(rows, server, limits, Path(folder))
        notes = ""
        if name == "limit halved":
            points = rate_over_time(result["answered_at"])
            down = follow_time(points, CHANGE_AT_S, lambda r: r <= 1.1 * SERVER_RPM / 2)
            up = follow_time(points, RESTORE_AT_S, lambda r: r >= 0.9 * SERVER_RPM)
            notes = f"down in {down} s, back up in {up} s"
        print(
            f"{name:26} {result['rows_ok']:>5} {result['rows_failed']:>4} "
            f"{result['requests']:>8} {result['share_429']:>9.2%} "
            f"{result['achieved_per_min']:>12.0f} "
            f"{result['achieved_per_min'] / (result['limit_per_min'] or 1):>8.1%} "
            f"{result['wall_s']:>7.1f}  {notes}",
            flush=True,
        )


if __name__ == "__main__":
    main()
