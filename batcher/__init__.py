"""batcher: run large batches of LLM chat-completion requests reliably and cheaply."""

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
