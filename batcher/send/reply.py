"""A server's 200, parsed at the boundary into a typed, bounded ``Reply`` (or an AttemptError).

Nothing past this module trusts a reply's shape. A field of the wrong type, a token count that
is negative or beyond any real reply, an index no request asks for: the attempt fails as
``bad_reply`` (retryable, like a body that is not JSON), never the run, a journal commit or
the output's rebuild. Only the fields batcher reads are kept; the rest is dropped unread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from batcher.flow.server_limits import ServerLimits
from batcher.send.attempt import AttemptError

# No real reply counts more tokens (the largest context windows are ~10^6), and an int over
# 2^63 cannot be stored: beyond this a count is a broken server, not a bill.
MAX_TOKENS = 10**9
MAX_COST_USD = 10**6  # a gateway's own `usage.cost` for one reply, same reasoning
MAX_CHOICES = 128  # request.n's own bound
MAX_TOOL_CALLS = 1024  # far past any model's parallel calls; stream assembly stays small
MAX_NAME = 1024  # ids, model names, finish reasons, roles: names, and tallied by name


Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS)]  # a JSON integer: not 1.5, true or "2"
Name = Annotated[str, Field(max_length=MAX_NAME)]
ChoiceIndex = Annotated[int, Field(ge=0, lt=MAX_CHOICES)]
CallIndex = Annotated[int, Field(ge=0, lt=MAX_TOOL_CALLS)]


class Strict(BaseModel):
    """No coercion (a number is not a string, ``true`` is not 1), unknown fields dropped."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")


class TokenDetails(Strict):
    cached_tokens: Tokens | None = None
    cache_write_tokens: Tokens | None = None
    reasoning_tokens: Tokens | None = None


class Usage(Strict):
    """Every usage count the gateway documents, bounded, whether or not batcher bills it."""

    prompt_tokens: Tokens | None = None
    completion_tokens: Tokens | None = None
    total_tokens: Tokens | None = None
    prompt_tokens_details: TokenDetails | None = None
    completion_tokens_details: TokenDetails | None = None
    cache_creation_input_tokens: Tokens | None = None
    cache_read_input_tokens: Tokens | None = None
    cost: Annotated[float, Field(ge=0, le=MAX_COST_USD, allow_inf_nan=False)] | None = None


class Function(Strict):
    name: str | None = None
    arguments: str | None = None


class ToolCall(Strict):
    id: Name | None = None
    type: Name | None = None
    function: Function | None = None


class Message(Strict):
    role: Name | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOL_CALLS)] | None = None


class Choice(Strict):
    index: ChoiceIndex = 0
    message: Message | None = None
    finish_reason: Name | None = None


class Completion(Strict):
    """A chat completion (``choices`` emptiness is checked apart: its own error kind)."""

    id: Name | None = None
    model: Name | None = None
    choices: Annotated[list[Choice], Field(max_length=MAX_CHOICES)] | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """What one successful reply says, flattened for the output row."""

    choices: list[dict[str, Any]]
    model: str | None
    response_id: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None
    ttft_s: float | None = None
    limits: ServerLimits | None = None  # what the reply's headers said of rate limits

    @property
    def first(self) -> dict[str, Any]:
        return self.choices[0]

    @classmethod
    def of(
        cls,
        choices: list[dict[str, Any]],
        model: str | None,
        response_id: str | None,
        usage: Usage | None,
        *,
        ttft_s: float | None = None,
        limits: ServerLimits | None = None,
    ) -> Reply:
        usage = usage or Usage()
        details = usage.prompt_tokens_details
        return cls(
            choices=choices,
            model=model,
            response_id=response_id,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            cached_tokens=details.cached_tokens if details is not None else None,
            ttft_s=ttft_s,
            limits=limits,
        )


def bad_reply(error: ValidationError, what: str = "reply") -> AttemptError:
    """The first thing wrong with a reply, on one line: where, and what was expected."""
    errors = error.errors(include_url=False, include_input=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "(root)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return AttemptError("bad_reply", f"{what} {where}: {first['msg']}{more}", retryable=True)


def call_dict(call: ToolCall) -> dict[str, Any]:
    function = call.function or Function()
    return {
        "id": call.id,
        "type": call.type or "function",
        "function": {"name": function.name or "", "arguments": function.arguments or ""},
    }


def choice_dict(choice: Choice) -> dict[str, Any]:
    """A validated choice as the plain dict the outcome reads (only the fields it reads)."""
    message = choice.message or Message()
    fields: dict[str, Any] = {"role": message.role or "assistant", "content": message.content}
    if message.reasoning_content is not None:
        fields["reasoning_content"] = message.reasoning_content
    if message.reasoning is not None:
        fields["reasoning"] = message.reasoning
    if message.tool_calls:
        fields["tool_calls"] = [call_dict(call) for call in message.tool_calls]
    plain: dict[str, Any] = {"index": choice.index, "message": fields}
    if choice.finish_reason is not None:
        plain["finish_reason"] = choice.finish_reason
    return plain


def parse_reply(content: bytes, limits: ServerLimits | None = None) -> Reply:
    """A 200's body as a Reply; a body that is not JSON, has no choices or does not fit the
    shape of a chat completion fails the attempt (retryable)."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        # The whole body, not a slice: the caller redacts it, then shortens it.
        raise AttemptError(
            "invalid_json",
            f"reply is not JSON: {content.decode('utf-8', 'replace')}",
            retryable=True,
        ) from None
    if not isinstance(data, dict):
        raise AttemptError("invalid_json", "reply is not a JSON object", retryable=True)
    try:
        completion = Completion.model_validate(data)
    except ValidationError as exc:
        raise bad_reply(exc) from None
    if not completion.choices:
        raise AttemptError("no_choices", "reply has no choices", retryable=True)
    return Reply.of(
        [choice_dict(choice) for choice in completion.choices],
        completion.model,
        completion.id,
        completion.usage,
        limits=limits,
    )
