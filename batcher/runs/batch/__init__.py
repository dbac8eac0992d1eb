"""Batch mode: the same job through the provider Batch API (``endpoint.mode: batch``)."""

from batcher.runs.batch.mode import BatchRun

__all__ = ["BatchRun"]
