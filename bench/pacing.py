"""Pacing benchmark: achieved rate and 429 share against a simulator that enforces a limit.

    python bench/pacing.py [--rows 1200]

Cases: the job configured exactly at the server's limit, and configured 3x above it with
adaptive on; each for requests/minute and for tokens/minute.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from batcher.runner import run
from batcher.sim import SimSettings, SimulatorThread

SERVER_RPM = 1200
SERVER_TPM = 36_000  # with these ~30-token requests: about 1,200 requests/minute too


def pacing_case(
    rows: int, server: dict[str, Any], limits: dict[str, Any], folder: Path
) -> dict[str, float]:
    """Run one job against a rate-limited simulator; returns rate, 429 share and wall time."""
    frame = pl.DataFrame(
        {"id": [f"r{i}" for i in range(rows)], "text": [f"row {i} " * 3 for i in range(rows)]}
    )
    frame.write_parquet(folder / "rows.parquet")
    with SimulatorThread(SimSettings(**server)) as sim:
        job = {
            "name": "pacing",
            "input": {"path": "rows.parquet", "id_column": "id"},
            "endpoint": {"base_url": sim.url},
            "request": {
                "model": "claude-3-5-haiku-20241022",
                "prompt": "{{ text }}",
                "max_tokens": 30,
            },
            "limits": {"concurrency": 64, **limits},
            "retry": {"max_attempts": 10, "initial_backoff_s": 0.05, "max_backoff_s": 2},
            "output": {"path": "out.parquet"},
        }
        path = folder / "job.yaml"
        path.write_text(yaml.safe_dump(job))
        started = time.monotonic()
        summary = run(path, quiet=True, fresh=True)
        wall = time.monotonic() - started
        assert sim.simulator is not None
        stats = sim.simulator
        return {
            "rows_ok": summary.rows_ok,
            "requests": stats.requests,
            "share_429": stats.statuses["429"] / max(stats.requests, 1),
            "achieved_per_min": (
                stats.achieved_tps() if "tokens_per_minute" in server else stats.achieved_rps()
            )
            * 60,
            "limit_per_min": server.get("requests_per_minute") or server["tokens_per_minute"],
            "wall_s": wall,
        }


CASES = {
    "rpm at limit": ({"requests_per_minute": SERVER_RPM}, {"requests_per_minute": SERVER_RPM}),
    "rpm 3x adaptive": (
        {"requests_per_minute": SERVER_RPM},
        {"requests_per_minute": 3 * SERVER_RPM},
    ),
    "tpm at limit": ({"tokens_per_minute": SERVER_TPM}, {"tokens_per_minute": SERVER_TPM}),
    "tpm 3x adaptive": ({"tokens_per_minute": SERVER_TPM}, {"tokens_per_minute": 3 * SERVER_TPM}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--case", choices=list(CASES), action="append")
    arguments = parser.parse_args()
    print(
        f"{'case':18} {'rows':>6} {'requests':>8} {'429 share':>9} {'achieved/min':>12} "
        f"{'of limit':>8} {'wall s':>7}"
    )
    for name in arguments.case or CASES:
        server, limits = CASES[name]
        with tempfile.TemporaryDirectory() as folder:
            result = pacing_case(arguments.rows, server, limits, Path(folder))
        print(
            f"{name:18} {result['rows_ok']:>6} {result['requests']:>8} {result['share_429']:>9.2%} "
            f"{result['achieved_per_min']:>12.0f} "
            f"{result['achieved_per_min'] / result['limit_per_min']:>8.1%} "
            f"{result['wall_s']:>7.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
