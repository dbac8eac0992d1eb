"""The provider Batch API over HTTP: OpenAI's ``/files`` and ``/batches``, as many servers serve it.

Few requests (an upload and a create per batch, then a status poll), so a plain
``httpx.AsyncClient`` with tenacity retries on transient failures is all it takes.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import orjson

from batcher.config import EndpointConfig, RetryConfig
from batcher.errors import BatchApiError, shorten
from batcher.send.attempt import AttemptError
from batcher.send.client import classify_status
from batcher.send.retry import retrying

CHAT_URL = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_TOO_LARGE = re.compile(r"too (large|big|many)|exceed|maximum", re.IGNORECASE)


class NoBatchApiError(Exception):
    """The server answered 404 or 405 on a Batch API path: it does not serve batches."""

    def __init__(self, path: str, status: int) -> None:
        super().__init__(f"{path} answered HTTP {status}")
        self.path = path
        self.status = status


class TooLargeError(Exception):
    """The server refused a file or batch for its size; a smaller one may pass."""


class BatchApi:
    """One run's connection to the Batch API of ``endpoint.base_url``."""

    def __init__(self, endpoint: EndpointConfig, api_key: str | None, retry: RetryConfig) -> None:
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(
            base_url=endpoint.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(endpoint.timeout_s),
        )
        self._endpoint = endpoint
        self._secret = api_key
        self._retry = retry

    async def __aenter__(self) -> Self:
        await self._client.__aenter__()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._client.__aexit__(kind, exc, tb)

    async def _call(
        self,
        method: str,
        path: str,
        *,
        upload: Path | None = None,
        once: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """One call, retried on transient failures; raises for anything else.

        ``upload`` is a file sent as the multipart ``file`` field. ``once`` makes a single
        attempt and lets a transient failure through as AttemptError, for callers that check
        whether the server did act before they try again.
        """
        policy = self._retry.model_copy(update={"max_attempts": 1}) if once else self._retry
        try:
            async for attempt in retrying(policy):
                with attempt:
                    response = await _send(self._client, method, path, upload, kwargs)
                    if response.status_code < 300:
                        return response
                    raise self._refusal(method, path, response)
        except AttemptError as exc:  # still failing after retry.max_attempts
            if once:
                raise
            raise BatchApiError(f"{method} /{path}: {exc}") from None
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    def _refusal(self, method: str, path: str, response: httpx.Response) -> Exception:
        """What a reply of 300 or more means: no Batch API, too large, a transient error
        (AttemptError, retried) or a refusal."""
        if response.status_code in (404, 405):
            return NoBatchApiError(f"{method} /{path}", response.status_code)
        error = classify_status(
            response, response.content, self._endpoint.api_key_env, self._secret
        )
        if response.status_code in (400, 413) and _TOO_LARGE.search(error.message):
            return TooLargeError(error.message)
        if error.retryable:
            return error
        return BatchApiError(f"{method} /{path}: HTTP {error.status}: {error.message}")

    async def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = await self._call(method, path, **kwargs)
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            raise BatchApiError(f"{method} /{path}: the reply is not a JSON object")
        return data

    async def probe(self) -> None:
        """Ask for one file and one batch: NoBatchApiError if either path is not served."""
        await self._call("GET", "files", params={"purpose": "batch", "limit": 1})
        await self._call("GET", "batches", params={"limit": 1})

    async def upload(self, path: Path) -> str:
        """Upload a JSONL file with purpose=batch under its own name; its file id."""

        async def send() -> str:
            data = await self._json(
                "POST", "files", upload=path, once=True, data={"purpose": "batch"}
            )
            return str(data["id"])

        return await _idempotent(self._retry, send, lambda: self.find_file(path.name))

    async def find_file(self, filename: str) -> str | None:
        """The id of an uploaded batch file by name (after a kill between upload and commit)."""
        data = await self._json("GET", "files", params={"purpose": "batch", "limit": 10_000})
        for item in data.get("data") or []:
            if isinstance(item, dict) and item.get("filename") == filename:
                return str(item["id"])
        return None

    async def create(self, file_id: str, completion_window: str, chunk: str) -> str:
        """Create the batch of an uploaded file, tagged with its chunk; the batch id."""

        async def send() -> str:
            data = await self._json(
                "POST",
                "batches",
                once=True,
                json={
                    "input_file_id": file_id,
                    "endpoint": CHAT_URL,
                    "completion_window": completion_window,
                    "metadata": {"batcher_chunk": chunk},
                },
            )
            return str(data["id"])

        async def find() -> str | None:
            found = await self.find_batch(chunk)
            return str(found["id"]) if found is not None else None

        return await _idempotent(self._retry, send, find)

    async def find_batch(self, chunk: str, pages: int = 10) -> dict[str, Any] | None:
        """A batch created for ``chunk`` (after a kill between create and commit)."""
        after: str | None = None
        for _ in range(pages):
            params: dict[str, Any] = {"limit": 100}
            if after:
                params["after"] = after
            data = await self._json("GET", "batches", params=params)
            items = [i for i in data.get("data") or [] if isinstance(i, dict)]
            for item in items:
                if (item.get("metadata") or {}).get("batcher_chunk") == chunk:
                    return item
            if not data.get("has_more") or not items:
                return None
            after = str(items[-1]["id"])
        return None

    async def get(self, batch_id: str) -> dict[str, Any]:
        return await self._json("GET", f"batches/{batch_id}")

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._json("POST", f"batches/{batch_id}/cancel")

    async def content(self, file_id: str) -> bytes:
        response = await self._call("GET", f"files/{file_id}/content")
        return response.content


async def _idempotent(
    retry: RetryConfig,
    send: Callable[[], Awaitable[str]],
    find: Callable[[], Awaitable[str | None]],
) -> str:
    """``send``, retried on transient failures; before each retry ``find`` asks whether the
    server acted on an attempt whose reply was lost (a timeout, a dropped connection), so
    a file is never uploaded, nor a batch created, twice."""
    first = True
    try:
        async for attempt in retrying(retry):
            with attempt:
                if not first and (found := await find()) is not None:
                    return found
                first = False
                return await send()
    except AttemptError as exc:
        raise BatchApiError(str(exc)) from None
    raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover


async def _send(
    client: httpx.AsyncClient, method: str, path: str, upload: Path | None, kwargs: dict[str, Any]
) -> httpx.Response:
    """One request; ``upload`` is a file sent as the multipart ``file`` field."""
    try:
        if upload is None:
            return await client.request(method, path, **kwargs)
        with upload.open("rb") as handle:
            files = {"file": (upload.name, handle, "application/jsonl")}
            return await client.request(method, path, files=files, **kwargs)
    except httpx.TransportError as exc:
        message = shorten(str(exc) or type(exc).__name__)
        raise AttemptError("connection", message, retryable=True) from None
