"""One failed attempt of one row: what the retry policy decides on, never a run failure."""

from __future__ import annotations

from batcher.flow.server_limits import ServerLimits


class AttemptError(Exception):
    """One attempt of one row failed.

    ``kind`` is the short machine name written before the colon in the output's ``error``
    column (``http_503``, ``timeout``, ``connection``, ``invalid_json``...).
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after_s: float | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after_s = retry_after_s
        self.limits = limits  # the rate limits the failed reply's headers stated
