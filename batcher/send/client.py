"""One HTTP attempt: send a body, classify what comes back into a Reply or an AttemptError."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Self

import aiohttp
import anyio
import httpx
import orjson

from batcher.config import EndpointConfig
from batcher.errors import AccountError, KeyRefusedError, shorten
from batcher.flow.server_limits import parse_retry_after, read_server_limits
from batcher.send.attempt import AttemptError
from batcher.send.body import read_body, read_lines
from batcher.send.redaction import redact
from batcher.send.reply import Reply, parse_reply
from batcher.send.stream import MAX_LINE_BYTES, StreamAssembler

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})
# Error `type` / `code` values that say the account cannot pay. Only these and HTTP 402 stop
# the job: words in a message do not (a 400 can quote a row about a "credit card", and a 503
# "billing service unavailable" is transient).
_ACCOUNT_CODES = frozenset({"insufficient_quota", "credit_balance_too_low", "payment_required"})
_ACCOUNT_PREFIX = "billing"
_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


def _error_fields(content: bytes) -> tuple[str, set[str]]:
    """The message of an error body (unshortened) and its ``type`` / ``code`` values."""
    text = content.decode("utf-8", "replace")
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        return text or "(empty body)", set()
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            codes = {str(error[f]).lower() for f in ("type", "code") if error.get(f) is not None}
            return str(error.get("message") or text), codes
        if isinstance(error, str):
            return error, set()
    return text, set()


def is_account_error(status: int, codes: set[str]) -> bool:
    """402, or an error type/code that names quota or billing (never words of a message)."""
    return status == 402 or any(
        code in _ACCOUNT_CODES or code.startswith(_ACCOUNT_PREFIX) for code in codes
    )


def classify_status(
    response: httpx.Response, content: bytes, key_env: str, secret: str | None = None
) -> AttemptError:
    """Turn a non-200 reply into an AttemptError, or raise when the whole run must stop.

    ``secret`` (the API key) is blanked out of the server's message: some servers echo the
    key they refused, and messages end up in the output and on the terminal.
    """
    status = response.status_code
    text, codes = _error_fields(content)
    message = shorten(redact(text, secret))
    if status in (401, 403):
        raise KeyRefusedError(
            f"the server refused the API key from ${key_env} (HTTP {status}: {message})",
            status=status,
        )
    if is_account_error(status, codes):
        raise AccountError(
            f"the account cannot pay for requests (HTTP {status}: {message}); "
            "top it up and run the same command again to resume",
            status=status,
        )
    return AttemptError(
        f"http_{status}",
        message,
        retryable=status in RETRYABLE_STATUS,
        status=status,
        retry_after_s=parse_retry_after(response.headers),
        limits=read_server_limits(response.headers),
    )


class ChatClient:
    """The run's one httpx transport, pooled to the concurrency.

    Requests go straight to the transport (``handle_async_request``) as prebuilt
    ``httpx.Request`` objects: one fixed URL and header set, no cookies, auth flows or
    redirects to resolve per request. Profiled, that per-request work of ``AsyncClient`` was a
    quarter of a whole run's CPU time at zero latency.
    """

    def __init__(
        self,
        endpoint: EndpointConfig,
        api_key: str | None,
        connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport`` replaces the one ``endpoint.transport`` names (unit tests pass an
        ``httpx.MockTransport``)."""
        self.endpoint = endpoint
        headers = dict(_HEADERS)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        if transport is None and endpoint.transport == "aiohttp":
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(limits=limits)
        elif transport is None:
            transport = httpx.AsyncHTTPTransport(limits=limits)
        self._transport = transport
        self._secret = api_key
        self._url = httpx.URL(endpoint.base_url.rstrip("/") + "/chat/completions")
        self._headers = httpx.Headers(headers)
        # The total per-attempt deadline is the caller's (anyio.fail_after); httpx's timeouts
        # are per read, so they only catch a connection that never answers at all.
        self._extensions = {"timeout": httpx.Timeout(endpoint.timeout_s).as_dict()}

    async def __aenter__(self) -> Self:
        await self._transport.__aenter__()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._transport.__aexit__(kind, exc, tb)

    async def _send(self, content: bytes) -> httpx.Response:
        request = httpx.Request(
            "POST", self._url, headers=self._headers, content=content, extensions=self._extensions
        )
        return await self._transport.handle_async_request(request)

    async def complete(self, body: dict[str, Any]) -> Reply:
        """One attempt. Raises AttemptError, or KeyRefusedError/AccountError for the run.

        The one place where a failed attempt's text (a server's body, a stream's error chunk,
        a transport's exception) is redacted and shortened before anything can store it.
        """
        try:
            return await self._complete(body)
        except AttemptError as exc:
            raise AttemptError(
                exc.kind,
                shorten(redact(exc.message, self._secret)),
                retryable=exc.retryable,
                status=exc.status,
                retry_after_s=exc.retry_after_s,
                limits=exc.limits,
            ) from None

    async def _complete(self, body: dict[str, Any]) -> Reply:
        content = orjson.dumps(body)
        try:
            if body.get("stream"):
                return await self._stream(content)
            response = await self._send(content)
            try:
                payload = await read_body(response, self.endpoint.max_response_bytes)
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            # httpx-aiohttp maps a dropped connection to ConnectTimeout; the cause tells.
            kind = "timeout" if _is_timeout(exc) else "connection"
            raise AttemptError(kind, _transport_message(exc), retryable=True) from None
        except httpx.TransportError as exc:
            raise AttemptError("connection", _transport_message(exc), retryable=True) from None
        except aiohttp.ClientError as exc:
            # What httpx-aiohttp leaves unmapped: a reply that is not HTTP (a bad status line,
            # an 8 KB header, a broken chunk), which httpx's own transport calls a protocol
            # error. Left alone, it ended the whole run with a traceback.
            message = str(exc) or type(exc).__name__
            raise AttemptError("connection", message, retryable=True) from None
        if response.status_code != 200:
            raise classify_status(response, payload, self.endpoint.api_key_env, self._secret)
        return parse_reply(payload, read_server_limits(response.headers))

    async def _stream(self, content: bytes) -> Reply:
        started = time.monotonic()
        response = await self._send(content)
        max_bytes = self.endpoint.max_response_bytes
        try:
            if response.status_code != 200:
                payload = await read_body(response, max_bytes)
                raise classify_status(response, payload, self.endpoint.api_key_env, self._secret)
            if "text/event-stream" not in response.headers.get("content-type", ""):
                # A proxy's page or a plain JSON reply: read it whole rather than as events.
                payload = await read_body(response, max_bytes)
                return parse_reply(payload, read_server_limits(response.headers))
            assembler = StreamAssembler(started, read_server_limits(response.headers))
            lines = read_lines(response, max_bytes, min(MAX_LINE_BYTES, max_bytes))
            async for line in _with_idle_timeout(lines, self.endpoint.stream_idle_timeout_s):
                if assembler.feed(line):
                    return assembler.reply()
        finally:
            await response.aclose()
        raise AttemptError("stream_broken", "the stream ended before [DONE]", retryable=True)


async def _with_idle_timeout(lines: AsyncIterator[bytes], idle_s: float) -> AsyncIterator[bytes]:
    while True:
        try:
            with anyio.fail_after(idle_s):
                line = await anext(lines)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise AttemptError(
                "stream_idle", f"no data for {idle_s:g} s mid-stream", retryable=True
            ) from None
        yield line


def _is_timeout(exc: httpx.TimeoutException) -> bool:
    cause = exc.__cause__
    return cause is None or isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__


def _transport_message(exc: httpx.HTTPError) -> str:
    return str(exc) or type(exc).__name__
