"""Journal benchmark: the writer's cost for new rows and for rows asked again.

    python bench/journal.py [--rows 100000] [--repeat 5]

Prints, as medians of ``--repeat`` runs, the seconds the journal's writer takes to commit
``--rows`` outcomes of new keys into an empty journal, then the same keys again (every row
superseded, as a rerun of a whole job with an edited prompt writes them).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from batcher.store.columns import Outcome, Usage
from batcher.store.journal import Journal

IDENTITY = {"input": "data.csv", "output": "out.parquet", "key_column": "id"}


def outcomes(rows: int, attempt: int) -> list[Outcome]:
    usage = Usage("claude-3-5-haiku-20241022", 120, 20, 140, None, 0.000176)
    return [
        Outcome.answered(
            f"k{i:07d}",
            bytes(16),
            response=f"label {attempt}",
            finish_reason="stop",
            usage=usage,
            latency_s=0.2,
            attempts=1,
            response_id=f"r{attempt}-{i}",
            extra=None,
            input_digest=bytes(16),
        )
        for i in range(rows)
    ]


def write(path: Path, batch: list[Outcome]) -> float:
    """Seconds from the first record to the last commit (close waits for the writer)."""
    journal = Journal(path, IDENTITY)
    started = time.perf_counter()
    for outcome in batch:
        journal.record(outcome)
    failure = journal.close()
    assert failure is None, failure
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    arguments = parser.parse_args()
    first, second = outcomes(arguments.rows, 1), outcomes(arguments.rows, 2)
    new, again = [], []
    for _ in range(arguments.repeat):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "journal.sqlite"
            new.append(write(path, first))
            again.append(write(path, second))
    print(f"{arguments.rows:,} new rows: {statistics.median(new):.2f} s (median of {len(new)})")
    print(f"{arguments.rows:,} rows asked again: {statistics.median(again):.2f} s")


if __name__ == "__main__":
    main()
