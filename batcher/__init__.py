"""batcher: run large batches of LLM chat-completion requests reliably and cheaply.

A row's path, and the stage that owns each step::

    rows/      input file ─→ rows ─→ checked plan ─→ request bodies     (reads, never sends)
      │
    flow/      a slot at the rate the server allows                      (pacing, discovery)
      │
    send/      one row's attempts over HTTP ─→ reply ─→ priced outcome   (client, retry, worker)
      │
    store/     journal of every outcome ─→ output rebuilt from it        (checkpoint, output)

    runs/      the run that drives them: one shell (lock, identity, journal, stop, output,
               summary) and its engines, live, batch/ (the Batch API) and ray/ (a cluster)
    reports/   the commands around a run: status, cost, agree, estimate, preview
    sim/       the simulator the tests and --simulate send to; it imports nothing else

Imports go one way, lowest first: ``config``/``errors`` < store < rows < flow < send < runs
< reports < ``cli``. The store is lowest because every stage hands it values (an outcome, a
predicate for the rebuild) and it asks nothing back; ``tests/test_layers.py`` holds the rule.
"""

from batcher.config import Job, load_job
from batcher.errors import (
    AbortError,
    AccountError,
    BatchApiError,
    BatcherError,
    BudgetReachedError,
    CheckpointBusyError,
    CheckpointCorruptError,
    CheckpointError,
    ConfigError,
    FirstRowsFailedError,
    InputError,
    InterruptedRunError,
    JournalMismatchError,
    KeyRefusedError,
    OutputError,
    RateLimitStallError,
)
from batcher.runs.shell import RunOptions, arun, run
from batcher.runs.summary import RunSummary

__all__ = [
    "AbortError",
    "AccountError",
    "BatchApiError",
    "BatcherError",
    "BudgetReachedError",
    "CheckpointBusyError",
    "CheckpointCorruptError",
    "CheckpointError",
    "ConfigError",
    "FirstRowsFailedError",
    "InputError",
    "InterruptedRunError",
    "Job",
    "JournalMismatchError",
    "KeyRefusedError",
    "OutputError",
    "RateLimitStallError",
    "RunOptions",
    "RunSummary",
    "arun",
    "load_job",
    "run",
]
