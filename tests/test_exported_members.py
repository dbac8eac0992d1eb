"""The public API is what __all__ says, sorted, and every name in it exists."""

from __future__ import annotations

import batcher


def test_public_api_is_pinned() -> None:
    assert batcher.__all__ == [
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
    assert batcher.__all__ == sorted(batcher.__all__)
    for name in batcher.__all__:
        assert getattr(batcher, name) is not None
