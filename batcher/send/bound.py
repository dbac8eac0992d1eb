"""The worst case of one request, without a tokenizer: what a dollar cap reserves for it.

Tokens in: a byte-level BPE token covers at least one byte, so the UTF-8 bytes of every text
the body carries bound its tokens in any script (the four-characters heuristic undercounts
Chinese or Japanese, three bytes a character, up to fourfold). The body's other fields (tools,
a schema) count by their JSON bytes, each message adds a chat template's markers, each image
what the provider bills for it. Tokens out: ``max_tokens`` (or ``max_completion_tokens``) of
the body for each of its ``n`` choices, else the model's most (``Price.max_output_tokens``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from batcher.rows.request import ImagePart, RowRequest, estimate_image_tokens
from batcher.send.prices import Price

# What a chat template wraps each message in (role markers, separators): a few tokens.
MESSAGE_TOKENS = 8
# What it adds once per request (the assistant turn's opening, a default system line).
REQUEST_TOKENS = 32
# An image is downsized to a long edge of 1568 px before it is billed (gateway-api.md); one
# of unknown size is billed as the largest.
IMAGE_EDGE_PX = 1568
# Reserved for each choice when neither the body nor the price table bounds the output: as
# much as the models with the longest output write.
DEFAULT_MAX_OUTPUT_TOKENS = 128_000


@dataclass(frozen=True, slots=True)
class Bound:
    """A request's worst case in tokens; ``output_limited``: its body sets ``max_tokens``."""

    prompt_tokens: int
    completion_tokens: int
    output_limited: bool

    def cost(self, price: Price) -> float:
        return price.cost(self.prompt_tokens, self.completion_tokens)


def request_bound(request: RowRequest, price: Price | None) -> Bound:
    """The most tokens ``request`` can be billed, in and out."""
    body = request.body
    prompt = REQUEST_TOKENS + _bytes({k: v for k, v in body.items() if k != "messages"})
    images = iter(request.images)
    for message in body.get("messages") or ():
        prompt += MESSAGE_TOKENS + _message_tokens(message, images)
    limit = _output_limit(body)
    if limit is None:
        known = price.max_output_tokens if price is not None else None
        per_choice = known or DEFAULT_MAX_OUTPUT_TOKENS
    else:
        per_choice = limit
    choices = body.get("n")
    copies = choices if isinstance(choices, int) and not isinstance(choices, bool) else 1
    return Bound(prompt, per_choice * max(copies, 1), limit is not None)


def image_tokens(width: int, height: int) -> int:
    """What the provider bills for one image, at most: downsized to ``IMAGE_EDGE_PX`` first."""
    if width <= 0 or height <= 0:
        width = height = IMAGE_EDGE_PX
    scale = min(1.0, IMAGE_EDGE_PX / max(width, height))
    return estimate_image_tokens(math.ceil(width * scale), math.ceil(height * scale))


def _message_tokens(message: Any, images: Any) -> int:
    if not isinstance(message, Mapping):
        return _bytes(message)
    tokens = _bytes({k: v for k, v in message.items() if k != "content"})
    content = message.get("content")
    if isinstance(content, str):
        return tokens + len(content.encode("utf-8", "surrogatepass"))
    for part in content if isinstance(content, list) else ():
        if isinstance(part, Mapping) and part.get("type") == "image_url":
            # Its URL is a digest or a data URL until sent: the image counts, not its text.
            image: ImagePart | None = next(images, None)
            tokens += image_tokens(image.width, image.height) if image else image_tokens(0, 0)
        elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
            tokens += len(part["text"].encode("utf-8", "surrogatepass"))
        else:
            tokens += _bytes(part)
    return tokens


def _output_limit(body: Mapping[str, Any]) -> int | None:
    """The body's own bound on one choice's output tokens (None: it sets none)."""
    limits = [
        value
        for name in ("max_tokens", "max_completion_tokens")
        if isinstance(value := body.get(name), int) and not isinstance(value, bool) and value > 0
    ]
    return max(limits) if limits else None


def _bytes(value: Any) -> int:
    return len(orjson.dumps(value, default=str))
