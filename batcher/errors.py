"""The errors batcher raises.

Row failures are data (an ``error`` string in the output); run failures are exceptions::

    BatcherError                 exit_code
    ├── ConfigError              2   the job file, an override or the input is wrong; nothing sent
    ├── JournalMismatchError     2   the checkpoint belongs to another job
    └── AbortError               3   the run stopped before the end
        ├── KeyRefusedError          401/403: the API key was refused
        ├── AccountError             402 or an exhausted balance
        ├── InterruptedRunError      Ctrl-C / SIGTERM
        ├── BudgetReachedError       limits.max_cost_usd would be crossed
        └── BatchApiError            the Batch API refused a file or batch operation

``AttemptError`` is not a ``BatcherError``: it describes one failed attempt of one row and is
caught by the retry policy, never by the user.
"""

from __future__ import annotations


class BatcherError(Exception):
    """Root of every error batcher shows the user as ``error: <message>``."""

    exit_code = 2


class ConfigError(BatcherError):
    """The job file, a ``--set`` override or the input data is not usable."""

    exit_code = 2


class JournalMismatchError(BatcherError):
    """The checkpoint journal was written by a different job."""

    exit_code = 2


class AbortError(BatcherError):
    """The run stopped before every row was tried; rerunning resumes it."""

    exit_code = 3


class KeyRefusedError(AbortError):
    """The server refused the API key (401/403)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class AccountError(AbortError):
    """The account cannot pay (402, or a message about balance or credit)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class InterruptedRunError(AbortError):
    """The user interrupted the run (Ctrl-C or SIGTERM)."""


class BudgetReachedError(AbortError):
    """Dispatching stopped because ``limits.max_cost_usd`` would be crossed."""


class BatchApiError(AbortError):
    """The provider Batch API refused an operation on a file or batch (batch mode)."""


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
    ) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after_s = retry_after_s
