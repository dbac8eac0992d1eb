"""Resume benchmark: a 1,000,000-row job with 900,000 rows already in its checkpoint.

    python bench/resume.py [--rows 1000000] [--done 900000]

Prints seconds from `batcher run` starting to its first new request reaching the simulator,
the run's total wall time, and its peak RSS (from wait4). The checkpoint is filled the way a
finished run would have left it (same fingerprints), without sending 900,000 requests first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import yaml

from batcher.config import load_job
from batcher.rows.plan import plan_job
from batcher.rows.request import RowRequest
from batcher.runs.shell import checkpoint_identity
from batcher.sim import SimulatorThread
from batcher.store.columns import Outcome, Usage
from batcher.store.journal import Journal, journal_path


def fill_checkpoint(job_path: Path, done: int) -> None:
    job = load_job(job_path)
    plan = plan_job(job, limit=done, api_key_required=False)
    identity, _ = checkpoint_identity(job, plan.source.key_column)
    journal = Journal(journal_path(job.checkpoint_dir), identity, fresh=True)
    for batch in plan.batches(batch_rows=50_000):
        for _, item, _ in plan.prepare(batch):
            assert isinstance(item, RowRequest)
            journal.record(
                Outcome.answered(
                    item.key,
                    item.fingerprint,
                    response="done before",
                    finish_reason="stop",
                    usage=Usage("claude-3-5-haiku-20241022", 10, 3, 13, None, 0.00002),
                    latency_s=0.01,
                    attempts=1,
                    response_id="x",
                    extra=None,
                    input_digest=item.input_digest,
                )
            )
    journal.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--done", type=int, default=900_000)
    parser.add_argument("--fill", metavar="JOB", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.fill:
        pl.DataFrame(
            {"text": [f"Say hello to row {i}." for i in range(arguments.rows)]}
        ).write_parquet(Path(arguments.fill).parent / "rows.parquet")
        fill_checkpoint(Path(arguments.fill), arguments.done)
        return
    with tempfile.TemporaryDirectory() as name, SimulatorThread() as sim:
        folder = Path(name)
        job = {
            "name": "resume",
            "input": {"path": "rows.parquet"},
            "endpoint": {"base_url": sim.url},
            "request": {
                "model": "claude-3-5-haiku-20241022",
                "prompt": "{{ text }}",
                "max_tokens": 16,
            },
            "limits": {"concurrency": 256},
            "output": {"path": "out.parquet"},
        }
        job_path = folder / "job.yaml"
        job_path.write_text(yaml.safe_dump(job))
        started = time.monotonic()
        # In a process of its own: Linux carries a parent's peak RSS into a child it forks, so
        # this process must stay small for wait4 to report the resumed run's own peak.
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--fill",
                str(job_path),
                "--rows",
                str(arguments.rows),
                "--done",
                str(arguments.done),
            ],
            check=True,
        )
        print(
            f"checkpoint filled with {arguments.done:,} rows in {time.monotonic() - started:.1f} s"
        )
        assert sim.simulator is not None
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "batcher.cli", "run", str(job_path), "--quiet"],
            stderr=subprocess.PIPE,
        )
        while sim.simulator.requests == 0 and process.poll() is None:
            time.sleep(0.01)
        first = time.monotonic() - started
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
        assert process.stderr is not None
        print(process.stderr.read().decode().strip())
        rows = pl.scan_parquet(folder / "out.parquet").select(pl.len()).collect().item()
        print(
            f"\nrows {arguments.rows:,}, already done {arguments.done:,}, "
            f"exit {os.waitstatus_to_exitcode(status)}"
        )
        print(f"seconds to first new request: {first:.2f}")
        print(f"resumed run wall time: {wall:.1f} s; requests sent: {sim.simulator.requests:,}")
        print(
            f"peak RSS of the resumed run: {usage.ru_maxrss / 1024:.0f} MB; output rows: {rows:,}"
        )


if __name__ == "__main__":
    main()
