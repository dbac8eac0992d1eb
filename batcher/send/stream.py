"""A streamed reply: server-sent chunks, each parsed at the boundary, assembled into one Reply.

A chunk of the wrong shape (``index: "zero"``, ``delta: "str"``, a tool call at index
4,000,000) fails the attempt as ``bad_reply``; assembly keeps only what chunks said, so its
size follows the bytes received (bounded by ``endpoint.max_response_bytes``), never an index.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import orjson
from pydantic import Field, ValidationError

from batcher.flow.server_limits import ServerLimits
from batcher.send.attempt import AttemptError
from batcher.send.reply import (
    MAX_CHOICES,
    MAX_TOOL_CALLS,
    CallIndex,
    ChoiceIndex,
    Function,
    Name,
    Reply,
    Strict,
    Usage,
    bad_reply,
)

# One SSE line carries one chunk: a few hundred bytes from a real server, and a whole reply
# sent as a single chunk stays far below. A line that never ends fails here, not at the cap.
MAX_LINE_BYTES = 8 * 1024 * 1024


class CallDelta(Strict):
    index: CallIndex | None = None
    id: Name | None = None
    type: Name | None = None
    function: Function | None = None


class Delta(Strict):
    role: Name | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: Annotated[list[CallDelta], Field(max_length=MAX_TOOL_CALLS)] | None = None


class ChoiceDelta(Strict):
    index: ChoiceIndex = 0
    delta: Delta | None = None
    finish_reason: Name | None = None


class Chunk(Strict):
    id: Name | None = None
    model: Name | None = None
    choices: Annotated[list[ChoiceDelta], Field(max_length=MAX_CHOICES)] | None = None
    usage: Usage | None = None


class _Call:
    """One tool call being assembled, its name and arguments in pieces (joined once)."""

    __slots__ = ("arguments", "id", "name", "type")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type = "function"
        self.name: list[str] = []
        self.arguments: list[str] = []

    def add(self, call: CallDelta) -> None:
        self.id = call.id or self.id
        self.type = call.type or self.type
        if call.function is not None:
            if call.function.name:
                self.name.append(call.function.name)
            if call.function.arguments:
                self.arguments.append(call.function.arguments)

    def plain(self) -> dict[str, Any]:
        function = {"name": "".join(self.name), "arguments": "".join(self.arguments)}
        return {"id": self.id, "type": self.type, "function": function}


class _Choice:
    """One choice being assembled: its texts in pieces, its tool calls by index."""

    __slots__ = ("calls", "finish_reason", "pieces")

    def __init__(self) -> None:
        self.pieces: dict[str, list[str]] = {}
        self.calls: dict[int, _Call] = {}
        self.finish_reason: str | None = None

    def add_call(self, call: CallDelta) -> None:
        position = len(self.calls) if call.index is None else call.index
        if position >= MAX_TOOL_CALLS:
            raise AttemptError(
                "bad_reply", f"a stream carried over {MAX_TOOL_CALLS} tool calls", retryable=True
            )
        target = self.calls.get(position)
        if target is None:
            target = self.calls[position] = _Call()
        target.add(call)

    def plain(self, index: int) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": None}
        for field, pieces in self.pieces.items():
            message[field] = "".join(pieces)
        if self.calls:
            message["tool_calls"] = [self.calls[i].plain() for i in sorted(self.calls)]
        return {"index": index, "message": message, "finish_reason": self.finish_reason}


class StreamAssembler:
    """Builds one Reply out of server-sent chat-completion chunks."""

    def __init__(self, started: float, limits: ServerLimits | None = None) -> None:
        self._started = started
        self._limits = limits
        self._ttft_s: float | None = None
        self._choices: dict[int, _Choice] = {}
        self._id: str | None = None
        self._model: str | None = None
        self._usage: Usage | None = None

    def feed(self, line: bytes) -> bool:
        """Take one SSE line; True once the stream is complete."""
        if not line.startswith(b"data:"):
            return False
        data = line[5:].strip()
        if data == b"[DONE]":
            if not self._choices:
                raise AttemptError("no_choices", "stream carried no choices", retryable=True)
            return True
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise AttemptError(
                "invalid_json", "a stream chunk is not JSON", retryable=True
            ) from None
        if not isinstance(raw, dict):
            raise AttemptError("invalid_json", "a stream chunk is not an object", retryable=True)
        if "error" in raw:
            error = raw["error"]
            message = error.get("message") if isinstance(error, dict) else error
            if not isinstance(message, str) or not message:
                message = data.decode("utf-8", "replace")
            raise AttemptError("stream_error", message, retryable=True)
        try:
            chunk = Chunk.model_validate(raw)
        except ValidationError as exc:
            raise bad_reply(exc, "stream chunk") from None
        self._id = chunk.id or self._id
        self._model = chunk.model or self._model
        self._usage = chunk.usage or self._usage
        for choice in chunk.choices or ():
            self._apply(choice)
        return False

    def _apply(self, delta_choice: ChoiceDelta) -> None:
        choice = self._choices.get(delta_choice.index)
        if choice is None:
            choice = self._choices[delta_choice.index] = _Choice()
        delta = delta_choice.delta
        if delta is not None:
            for field in ("content", "reasoning_content", "reasoning"):
                piece = getattr(delta, field)
                if piece:
                    self._first_token()
                    choice.pieces.setdefault(field, []).append(piece)
            for call in delta.tool_calls or ():
                self._first_token()
                choice.add_call(call)
        if delta_choice.finish_reason:
            choice.finish_reason = delta_choice.finish_reason

    def _first_token(self) -> None:
        if self._ttft_s is None:
            self._ttft_s = time.monotonic() - self._started

    def reply(self) -> Reply:
        if any(c.finish_reason is None for c in self._choices.values()):
            raise AttemptError("stream_broken", "a choice never finished", retryable=True)
        choices = [self._choices[index].plain(index) for index in sorted(self._choices)]
        return Reply.of(
            choices, self._model, self._id, self._usage, ttft_s=self._ttft_s, limits=self._limits
        )
