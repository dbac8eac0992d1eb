"""The errors batcher raises.

Row failures are data (an ``error`` string in the output); run failures are exceptions::

    BatcherError                 exit_code
    ├── ConfigError              2   the job file, an override or the input is wrong; nothing sent
    ├── JournalMismatchError     2   the checkpoint belongs to another job
    ├── CheckpointBusyError      2   another run of the same job holds the checkpoint
    ├── CheckpointCorruptError   2   the checkpoint is damaged; --fresh replaces it
    └── AbortError               3   the run stopped before the end
        ├── KeyRefusedError          401/403: the API key was refused
        ├── AccountError             402, or a quota/billing error type or code
        ├── InterruptedRunError      Ctrl-C / SIGTERM
        ├── BudgetReachedError       limits.max_cost_usd would be crossed
        ├── RateLimitStallError      nothing but 429s for limits.stall_timeout_s
        ├── FirstRowsFailedError     the run's first rows all failed the same way (a mistake)
        ├── CheckpointError          the checkpoint could not be written or read mid-run
        ├── OutputError              the output could not be written; a rerun rebuilds it
        ├── InputError               the input could not be read past a row, mid-run
        └── BatchApiError            the Batch API refused a file or batch operation

``send.attempt.AttemptError`` is not a ``BatcherError``: it describes one failed attempt of
one row and is caught by the retry policy, never by the user.
"""

from __future__ import annotations

import re

MESSAGE_CHARS = 300
# What a terminal would act on rather than show: escape sequences (CSI, as ESC [ or C1 0x9b;
# OSC, DCS, SOS, PM and APC up to their BEL or ST, such as OSC 52's clipboard write; the
# other ESC ones), then any control character left (C0 but tab, DEL, C1) and the line and
# bidirectional-override characters that can hide or reorder what follows.
_ESCAPE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)"
    r"|\x1b[ -/]*[0-~]"
)
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def shorten(text: str, limit: int = MESSAGE_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters (an error column, a terminal line)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: each escape sequence and control character of a
    server's words (a message, a model name) shown as ``?``, so none clears the screen,
    writes the clipboard or, with a carriage return, prints a forged line over ours."""
    if text.isprintable():  # nearly every line: no regex
        return text
    return _CONTROL.sub("?", _ESCAPE.sub("?", text))


def exit_code(error: BaseException | None, rows_failed: int = 0) -> int:
    """A command's exit status, the one place it is decided (README, "Exit codes"): its
    error's code; 3 for an interrupt outside a run; else 1 if rows failed, 0 if none."""
    if isinstance(error, BatcherError):
        return error.exit_code
    if error is not None:
        return 3  # KeyboardInterrupt: SIGINT or SIGTERM before or after a run's own handling
    return 1 if rows_failed else 0


class BatcherError(Exception):
    """Root of every error batcher shows the user as ``error: <message>``."""

    exit_code = 2

    def __reduce__(self) -> tuple[object, ...]:
        # Pickled whole, context attributes included (``--ray`` brings a shard's error back to
        # the driver): the default calls ``type(self)(*args)``, which lacks keyword context.
        return _rebuilt, (type(self), self.args, self.__dict__)


def _rebuilt(
    kind: type[BatcherError], args: tuple[object, ...], state: dict[str, object]
) -> BatcherError:
    error = kind.__new__(kind, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class ConfigError(BatcherError):
    """The job file, a ``--set`` override or the input data is not usable."""

    exit_code = 2


class JournalMismatchError(BatcherError):
    """The checkpoint journal was written by a different job."""

    exit_code = 2


class CheckpointBusyError(BatcherError):
    """Another run of the same job holds the checkpoint's lock."""

    exit_code = 2


class CheckpointCorruptError(BatcherError):
    """The checkpoint's SQLite file is damaged (found when it is opened)."""

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
    """The account cannot pay (402, or an error type/code of quota or billing)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class InterruptedRunError(AbortError):
    """The user interrupted the run (Ctrl-C or SIGTERM)."""


class BudgetReachedError(AbortError):
    """Dispatching stopped because ``limits.max_cost_usd`` would be crossed: the job had
    spent too much of it for the next request's worst case, ``request_usd`` (None: the cap
    was spent), which ``output_limited`` says whether ``request.max_tokens`` bounded."""

    def __init__(
        self, message: str, *, request_usd: float | None = None, output_limited: bool = True
    ) -> None:
        super().__init__(message)
        self.request_usd = request_usd
        self.output_limited = output_limited


class RateLimitStallError(AbortError):
    """The server answered nothing but 429 for ``limits.stall_timeout_s``, or asked to wait
    longer than that."""


class FirstRowsFailedError(AbortError):
    """The first ``limits.early_stop_rows`` rows this run sent all failed with the same
    ``kind`` of error that retries do not cure: a mistake in the job, found only by sending."""

    def __init__(self, message: str, *, kind: str, rows: int) -> None:
        super().__init__(message)
        self.kind = kind
        self.rows = rows


class CheckpointError(AbortError):
    """The checkpoint failed after requests were sent (disk full, folder deleted, damage).

    What was committed before is kept; rows answered since are pending for the next run.
    """


class OutputError(AbortError):
    """The output file could not be written; the checkpoint still holds every answer."""


class InputError(AbortError):
    """The input failed to read after the run started (a value that does not parse as its
    declared ``input.dtypes`` type, a damaged line); rows before ``row`` are usable."""

    def __init__(self, message: str, *, row: int | None = None, column: str | None = None):
        super().__init__(message)
        self.row = row
        self.column = column


class BatchApiError(AbortError):
    """The provider Batch API refused an operation on a file or batch (batch mode)."""
