"""Finding a secret in the files a test wrote, in every form a server could echo it in.

Written apart from ``batcher.send.redaction`` on purpose, so a form the redaction forgets is
not forgotten here too: the raw secret in any letter case, percent-encoded, and base64 (both
alphabets) at each of the 3 offsets it can start at inside a longer encoded string, each base64
form cut one character short at both ends (whatever wraps the secret decides those).
Parquet files are read through their columns' data (their pages are compressed); every other
file (journals, logs, inputs) as its bytes.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq


def forms(secret: str) -> set[bytes]:
    """Lower-cased byte strings, any of which in a lower-cased text betrays ``secret``."""
    found = {secret, quote(secret, safe=""), quote(secret)}
    raw = secret.encode()
    for offset in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * offset + raw).decode()
            # Whole groups of 4 characters past the offset's group, less one at either end.
            start = 4 if offset else 0
            end = 4 * ((offset + len(raw)) // 3)
            core = encoded[start + 1 : end - 1]
            if len(core) >= 8:
                found |= {core, quote(core, safe="")}
    return {form.lower().encode() for form in found}


def leaks(roots: Iterable[Path], secrets: Iterable[str]) -> list[str]:
    """``path: form`` for every file under ``roots`` that holds a form of a secret."""
    wanted = {form for secret in secrets for form in forms(secret)}
    found = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            try:
                data = _text_of(path).lower()
            except OSError:
                continue  # gone meanwhile, or not ours to read (a socket, a lock)
            found += [f"{path}: {form.decode()}" for form in wanted if form in data]
    return found


def _text_of(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix != ".parquet" or not data.startswith(b"PAR1"):
        return data
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError):
        return data  # a torn part: its bytes are all there is
    return data + b"\n".join(_column_bytes(column.combine_chunks()) for column in table.columns)


def _column_bytes(array: pa.Array) -> bytes:
    """Every string's bytes in a column, nested ones included: its data buffer, as is."""
    kind = array.type
    if pa.types.is_dictionary(kind):
        return _column_bytes(array.dictionary)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _column_bytes(array.flatten())
    if pa.types.is_struct(kind):
        return b"\n".join(_column_bytes(array.field(i)) for i in range(kind.num_fields))
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind):
        buffer = array.buffers()[2]
        return buffer.to_pybytes() if buffer is not None else b""
    return b""
