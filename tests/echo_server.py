"""An OpenAI-compatible server on a loopback port that echoes the key it is sent back
in every field of its replies, and puts escape sequences in its words.

What a reply does is chosen by a marker in the prompt:

- none: a 200 whose content, reasoning, tool-call arguments, id and model carry the key,
  raw, in base64 (of ``Bearer <key>``, of ``<user>:<key>``, URL-safe unpadded) and
  percent-encoded (streamed when the request asks for a stream);
- ``[[echo401]]``: a 401 whose message quotes the key in those forms;
- ``[[escape401]]``: a 401 whose message clears the screen, writes the clipboard (OSC 52)
  and, after a carriage return, forges a line of the summary;
- ``[[escape-model]]``: a 200 (without the key) from a model whose name has escapes.
"""

from __future__ import annotations

import base64
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

import orjson

ESCAPES = "\x1b[2J\x1b]52;c;cHduZWQ=\x07\x9b31m\rrows: 20 ok, 0 failed"


def echoes(key: str) -> str:
    """The key in the forms a server echoes it in, in one text."""
    basic = base64.b64encode(f"user:{key}".encode()).decode()
    bearer = base64.b64encode(f"Bearer {key}".encode()).decode()
    bare = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
    return f"key {key} upper {key.upper()} Basic {basic} token {bearer} {bare} ?k={quote(key)}"


def completion(key: str, model: str) -> dict[str, Any]:
    call: dict[str, Any] = {"id": f"call-{key}", "type": "function"}
    call["function"] = {"name": "f", "arguments": orjson.dumps({"k": echoes(key)}).decode()}
    message = {
        "role": "assistant",
        "content": f"answer: {echoes(key)}",
        "reasoning_content": f"thinking of {echoes(key)}",
        "tool_calls": [call],
    }
    return {
        "id": f"resp-{key}",
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def chunks(reply: dict[str, Any]) -> bytes:
    """``reply`` as a stream of server-sent events."""
    message = reply["choices"][0]["message"]
    calls = [{"index": 0, **call} for call in message["tool_calls"]]
    deltas = [
        {"role": "assistant", "content": message["content"]},
        {"reasoning_content": message["reasoning_content"]},
        {"tool_calls": calls},
    ]
    events = [
        {**reply, "choices": [{"index": 0, "delta": delta}], "usage": None} for delta in deltas
    ]
    events.append({**reply, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    lines = [b"data: " + orjson.dumps(event) + b"\n\n" for event in events]
    return b"".join(lines) + b"data: [DONE]\n\n"


class EchoServer:
    """The server in a background thread; ``keys`` counts the Authorization headers seen."""

    def __init__(self) -> None:
        self.keys: Counter[str] = Counter()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
                auth = self.headers.get("Authorization", "")
                owner.keys[auth] += 1
                status, content, kind = owner.answer(body, auth.removeprefix("Bearer "))
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *_: object) -> None:
                pass  # quiet: no request lines on stderr

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, body: dict[str, Any], key: str) -> tuple[int, bytes, str]:
        prompt = str(body["messages"][-1]["content"])
        if "[[echo401]]" in prompt or "[[escape401]]" in prompt:
            words = echoes(key) if "[[echo401]]" in prompt else ESCAPES
            error = {"error": {"message": f"invalid key: {words}", "type": "auth"}}
            return 401, orjson.dumps(error), "application/json"
        if "[[escape-model]]" in prompt:
            reply = completion("-", f"model{ESCAPES}")
        else:
            reply = completion(key, f"gpt-{key}")
        if body.get("stream"):
            return 200, chunks(reply), "text/event-stream"
        return 200, orjson.dumps(reply), "application/json"

    def __enter__(self) -> EchoServer:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
