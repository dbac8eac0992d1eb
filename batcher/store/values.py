"""What a journal column can hold: every value of an outcome is checked against its column's
SQLite type before it is queued, so the writer thread only ever gets rows it can commit.

A value that does not fit (an integer past 64 bits, a float that is not finite, an object
where text belongs, text that is not valid Unicode or is too long) once killed the writer
thread, or failed its whole commit batch, while the run went on paying for replies. Such an
outcome is stored as a failed row instead: kind ``bad_reply`` (``interrupted`` stays
``interrupted``, so the row is sent again), the values that do not fit left empty and named
in its ``error``, and every value that fits kept, so its tokens and cost still count. A row
key that does not fit cannot be stored at all; ``fitted`` raises CheckpointError.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import orjson

from batcher.errors import CheckpointError, shorten
from batcher.store.columns import COLUMN_NAMES, COLUMNS, INTERRUPTED, Column, Outcome

# The error kind of an outcome with a value the journal cannot store (as for a reply the
# client could not read: both come from a server's reply).
BAD_REPLY = "bad_reply"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# One stored text or blob at most: SQLite refuses 1e9 bytes (SQLITE_MAX_LENGTH), and the
# writer queue holds values until their commit; the longest answer a model gives is under 1 MB.
MAX_VALUE_BYTES = 64 * 2**20


class _Misfit(Exception):  # noqa: N818 - internal control flow, raised only on a bad value
    """Why a value cannot be stored in its column."""


def _integer(value: Any) -> Any:
    if not isinstance(value, int):
        raise _Misfit(f"is {_kind(value)}, not an integer")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise _Misfit(f"is a {value.bit_length()}-bit integer, wider than 64 bits")
    return value


def _real(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Misfit(f"is {_kind(value)}, not a number")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int past a float's range
        finite = False
    if not finite:
        raise _Misfit("is not a finite number")
    return value


def _text(value: Any) -> Any:
    if not isinstance(value, str):
        raise _Misfit(f"is {_kind(value)}, not text")
    if value.isascii():
        size = len(value)
    else:
        try:
            size = len(value.encode())
        except UnicodeEncodeError:
            raise _Misfit("is not valid Unicode (a lone surrogate)") from None
    if size > MAX_VALUE_BYTES:
        raise _Misfit(f"is {size:,} bytes, over {MAX_VALUE_BYTES:,}")
    return value


def _blob(value: Any) -> Any:
    if not isinstance(value, bytes):
        raise _Misfit(f"is {_kind(value)}, not bytes")
    if len(value) > MAX_VALUE_BYTES:
        raise _Misfit(f"is {len(value):,} bytes, over {MAX_VALUE_BYTES:,}")
    return value


def _json(value: Any) -> Any:
    """A dict, as JSON text (an empty one as nothing)."""
    if not isinstance(value, dict):
        raise _Misfit(f"is {_kind(value)}, not an object")
    if not value:
        return None
    try:
        encoded = orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise _Misfit(f"cannot be written as JSON ({exc})") from None
    if len(encoded) > MAX_VALUE_BYTES:
        raise _Misfit(f"is {len(encoded):,} bytes, over {MAX_VALUE_BYTES:,}")
    return encoded.decode()


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", float: "a float"}.get(
        type(value), f"a {type(value).__name__}"
    )


_EXPECTED: dict[str, type] = {"INTEGER": int, "REAL": float, "TEXT": str, "BLOB": bytes}


def _checker(column: Column) -> Callable[[Any], Any]:
    if column.json:
        return _json
    return {"INTEGER": _integer, "REAL": _real, "TEXT": _text, "BLOB": _blob}[column.sql]


# (position in the row, the Python type its values nearly always have, its check), for every
# column after the key.
_CHECKS = tuple(
    (index, _EXPECTED[c.sql] if not c.json else dict, _checker(c))
    for index, c in enumerate(COLUMNS, start=1)
)
_VALUES = operator.attrgetter("key", *COLUMN_NAMES)


def fitted(outcome: Outcome) -> tuple[Outcome, tuple[Any, ...]]:
    """The outcome as the journal stores it, and its row ``(key, *COLUMN_NAMES)``: the outcome
    itself when every value fits its column (nearly always), else the failed outcome the
    module's docstring describes. Raises CheckpointError when its key cannot be stored."""
    row = list(_VALUES(outcome))
    row[0] = _key(row[0])
    misfits: dict[str, str] = {}
    for index, expected, check in _CHECKS:
        value = row[index]
        if value is None:
            continue
        # The common values pass without a call: 2.5 us a row, against 5 us with one each.
        kind = type(value)
        if kind is str:
            if expected is str and value.isascii() and len(value) <= MAX_VALUE_BYTES:
                continue
        elif kind is int or kind is bool:
            if expected is int and _INT64_MIN <= value <= _INT64_MAX:
                continue
        elif kind is float:
            if expected is float and math.isfinite(value):
                continue
        elif kind is bytes and expected is bytes and len(value) <= MAX_VALUE_BYTES:
            continue
        try:
            row[index] = check(value)
        except _Misfit as misfit:
            misfits[COLUMN_NAMES[index - 1]] = str(misfit)
            row[index] = None
    if not misfits:
        return outcome, tuple(row)
    stored = _unfit(outcome, misfits)
    return stored, fitted(stored)[1]


def as_row(outcome: Outcome) -> tuple[Any, ...]:
    """``(key, *COLUMN_NAMES)`` of one outcome, as ``fitted`` stores it."""
    return fitted(outcome)[1]


def _key(key: Any) -> Any:
    try:
        return _integer(key) if isinstance(key, int) else _text(key)
    except _Misfit as misfit:
        raise CheckpointError(
            f"a row key that {misfit} cannot be stored in the checkpoint; nothing more is sent"
        ) from None


def _unfit(outcome: Outcome, misfits: dict[str, str]) -> Outcome:
    kind = INTERRUPTED if outcome.error_kind == INTERRUPTED else BAD_REPLY
    said = "; ".join(f"{name} {why}" for name, why in misfits.items())
    changes: dict[str, Any] = dict.fromkeys(misfits)
    changes.update(ok=False, error_kind=kind, error=f"{kind}: {shorten(said)} (not stored)")
    return replace(outcome, **changes)
