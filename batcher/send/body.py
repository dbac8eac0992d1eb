"""A response body read within bounds: bytes counted after decompression, as they arrive.

httpx inflates each network chunk whole (``decompressobj.decompress`` with no ``max_length``)
and ``aread`` keeps everything: a 510 KB gzip bomb held 5.3 GB. Here the raw stream is decoded
in pieces of at most ``PIECE_BYTES``, and reading stops as soon as the decoded (or the raw)
total passes ``endpoint.max_response_bytes``, so memory stays near the cap, whatever the
server sends. Encodings other than gzip and deflate pass through as they came, as httpx does
without the brotli and zstandard packages (then the body fails to parse, as it would there).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Iterator

import httpx

from batcher.send.attempt import AttemptError

PIECE_BYTES = 64 * 1024  # most one inflate step may produce


class _Inflate:
    """One gzip or deflate layer, inflated at most PIECE_BYTES at a time."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        gzip = encoding in ("gzip", "x-gzip")
        self._zlib = zlib.decompressobj(zlib.MAX_WBITS | 16 if gzip else zlib.MAX_WBITS)
        self._raw_deflate_tried = gzip  # deflate is zlib-wrapped or, for some servers, raw

    def feed(self, data: bytes) -> Iterator[bytes]:
        while not self._zlib.eof:
            try:
                piece = self._zlib.decompress(data, PIECE_BYTES)
            except zlib.error:
                if self._raw_deflate_tried:
                    raise AttemptError(
                        "bad_reply", f"the body is not valid {self.encoding}", retryable=True
                    ) from None
                self._raw_deflate_tried = True
                self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                continue
            self._raw_deflate_tried = True
            data = self._zlib.unconsumed_tail
            if piece:
                yield piece
            if not data and len(piece) < PIECE_BYTES:
                return  # all input taken and no output left waiting


def _layers(headers: httpx.Headers) -> list[_Inflate]:
    """The decoders of a Content-Encoding, in the order they undo it."""
    names = [name.strip().lower() for name in headers.get("content-encoding", "").split(",")]
    known = [name for name in names if name in ("gzip", "x-gzip", "deflate")]
    return [_Inflate(name) for name in reversed(known)]


def _through(layers: list[_Inflate], data: bytes) -> Iterator[bytes]:
    if not layers:
        yield data
        return
    for piece in layers[0].feed(data):
        yield from _through(layers[1:], piece)


def too_large(max_bytes: int) -> AttemptError:
    # Not retried: a server that sent this much for a request will likely do it again, and
    # every retry is another paid reply of that size.
    return AttemptError(
        "reply_too_large",
        f"the reply is over endpoint.max_response_bytes={max_bytes}",
        retryable=False,
    )


async def iter_body(response: httpx.Response, max_bytes: int) -> AsyncIterator[bytes]:
    """The decoded body in pieces; AttemptError ``reply_too_large`` past ``max_bytes``."""
    try:
        whole = response.content  # built whole (httpx.MockTransport), decoded already
    except httpx.ResponseNotRead:
        pass
    else:
        if len(whole) > max_bytes:
            raise too_large(max_bytes)
        yield whole
        return
    layers = _layers(response.headers)
    raw = decoded = 0
    async for chunk in response.aiter_raw():
        raw += len(chunk)
        if raw > max_bytes:
            raise too_large(max_bytes)
        for piece in _through(layers, chunk):
            decoded += len(piece)
            if decoded > max_bytes:
                raise too_large(max_bytes)
            yield piece


async def read_body(response: httpx.Response, max_bytes: int) -> bytes:
    """The whole decoded body, at most ``max_bytes`` of it."""
    parts = [piece async for piece in iter_body(response, max_bytes)]
    return b"".join(parts)


async def read_lines(
    response: httpx.Response, max_bytes: int, max_line_bytes: int
) -> AsyncIterator[bytes]:
    """The body's lines (ends: \\n, \\r\\n or \\r), none longer than ``max_line_bytes``."""
    pending = bytearray()
    async for piece in iter_body(response, max_bytes):
        end = max(piece.rfind(b"\n"), piece.rfind(b"\r"))
        if end < 0:
            pending += piece
            if len(pending) > max_line_bytes:
                raise _line_too_long(max_line_bytes)
            continue
        pending += piece[: end + 1]
        for line in bytes(pending).splitlines():
            if len(line) > max_line_bytes:
                raise _line_too_long(max_line_bytes)
            yield line
        pending = bytearray(piece[end + 1 :])
    if pending:
        yield bytes(pending)


def _line_too_long(max_line_bytes: int) -> AttemptError:
    return AttemptError(
        "reply_too_large", f"a stream line is over {max_line_bytes} bytes", retryable=False
    )
