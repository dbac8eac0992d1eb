"""Parts for unit tests: a clock that moves only when something sleeps, sleeps that record
instead of waiting, and replies served by ``httpx.MockTransport``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import orjson

Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class FakeTime:
    """A clock that moves only when someone sleeps: ``clock`` reads ``now``; ``sleep`` moves
    it (and lets other tasks run); the named sleeps also record their waits."""

    now: float = 0.0
    retry_waits: list[float] = field(default_factory=list)
    pace_waits: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)
        await anyio.lowlevel.checkpoint()

    async def retry_sleep(self, seconds: float) -> None:
        self.retry_waits.append(seconds)
        self.now += seconds

    async def pace_sleep(self, seconds: float) -> None:
        self.pace_waits.append(seconds)
        self.now += seconds


def completion(content: str = "hello", *, prompt_tokens: int = 10) -> dict[str, Any]:
    return {
        "id": "resp-1",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 5,
            "total_tokens": prompt_tokens + 5,
        },
    }


def answer(content: str = "hello") -> httpx.Response:
    return httpx.Response(200, content=orjson.dumps(completion(content)))


def refusal(status: int, retry_after_s: float | None = None) -> httpx.Response:
    headers = {"retry-after": f"{retry_after_s:g}"} if retry_after_s is not None else {}
    body = orjson.dumps({"error": {"message": f"status {status}"}})
    return httpx.Response(status, content=body, headers=headers)


@dataclass
class Script:
    """Serves ``responses`` in order (the last one again once they run out), keeping what
    was sent."""

    responses: list[httpx.Response]
    sent: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(orjson.loads(request.content))
        index = min(len(self.sent), len(self.responses)) - 1
        return self.responses[index]

    @classmethod
    def of(cls, *responses: httpx.Response | Iterable[httpx.Response]) -> Script:
        flat: list[httpx.Response] = []
        for item in responses:
            flat += [item] if isinstance(item, httpx.Response) else list(item)
        return cls(flat)
