"""The public API is what __all__ says, sorted, and every name in it exists."""

from __future__ import annotations

import types

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


def test_every_public_member_is_exported_and_nothing_else() -> None:
    # As httpx pins its own: the names a user sees in the package are exactly __all__.
    public = {
        name
        for name, member in vars(batcher).items()
        if not name.startswith("_") and not isinstance(member, types.ModuleType)
    }
    assert public == set(batcher.__all__)
    for name in batcher.__all__:
        assert getattr(batcher, name).__module__.startswith("batcher.")
