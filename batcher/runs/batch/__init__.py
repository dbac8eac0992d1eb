"""Batch mode: the same job through the provider Batch API (``endpoint.mode: batch``)."""

from batcher.runs.batch.mode import BatchEngine

__all__ = ["BatchEngine"]
