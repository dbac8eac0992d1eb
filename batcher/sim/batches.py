"""The simulator's Batch API: ``/files`` and ``/batches`` as OpenAI serves them.

A batch is worked out when it is first looked at after ``batch_delay_s``: each line gets the
reply the live endpoint would give (same tokens), except a ``batch_fail_share`` of lines whose
first submission fails with 500, and the batches named in ``batch_expire`` expire with only
their first half done. Output and error lines come shuffled, as a real server may return them.
Uploads over ``batch_max_file_bytes`` are refused with 413 and batches over
``batch_max_lines`` with 400, both as too large. ``batch_reply_delay_s`` holds the reply to
an upload or a create after the file or batch is stored, so a test can kill the client in
between. ``GET /sim/batches`` reports what it saw.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from batcher.sim.faults import violates_schema
from batcher.sim.files import FileStore, error_body, error_response, json_response
from batcher.sim.replies import build_reply, digest, user_text

if TYPE_CHECKING:
    from batcher.sim.server import Simulator

_TERMINAL = ("completed", "failed", "expired", "cancelled")
_CHAT = "/v1/chat/completions"


class BatchService:
    """Files, batches and their processing, for one simulator."""

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator
        self.settings = simulator.settings
        self.store = FileStore(self.settings)
        self.reset()

    def reset(self) -> None:
        """Forget every file and batch (a test's simulator as good as new)."""
        self.store.reset()
        self.files = self.store.files
        self.file_objects = self.store.file_objects
        self.batches: dict[str, dict[str, Any]] = {}
        self._started: dict[str, float] = {}
        self._cancelled_at: dict[str, float] = {}
        self._ordinal: dict[str, int] = {}  # 1-based, in order of creation
        self._random = random.Random(self.settings.seed)
        self.uploaded = self.store.uploaded  # custom_id → times uploaded
        self.uploaded_prompts = self.store.uploaded_prompts
        self.file_sizes = self.store.file_sizes
        self.lines = LineRunner(self.simulator)
        self.answered_by_prompt = self.lines.answered_by_prompt
        self.fates: dict[str, str] = {}  # custom_id → ok, 500, 400, expired, cancelled
        self.batch_lines: list[int] = []
        self.refused_batches = 0
        self.cancel_requests = 0

    @property
    def refused_uploads(self) -> int:
        return self.store.refused_uploads

    def register(self, app: web.Application) -> None:
        for prefix in ("/v1", ""):
            app.router.add_post(f"{prefix}/files", self.store.upload)
            app.router.add_get(f"{prefix}/files", self.store.list_files)
            app.router.add_get(f"{prefix}/files/{{file_id}}/content", self.store.content)
            app.router.add_post(f"{prefix}/batches", self._create)
            app.router.add_get(f"{prefix}/batches", self._list_batches)
            app.router.add_get(f"{prefix}/batches/{{batch_id}}", self._get)
            app.router.add_post(f"{prefix}/batches/{{batch_id}}/cancel", self._cancel)
        app.router.add_get("/sim/batches", self._stats)

    def stats(self) -> dict[str, Any]:
        return {
            "uploaded": dict(self.uploaded),
            "fates": self.fates,
            "file_sizes": self.store.file_sizes,
            "batch_lines": self.batch_lines,
            "refused_uploads": self.store.refused_uploads,
            "refused_batches": self.refused_batches,
            "cancel_requests": self.cancel_requests,
            "statuses": dict(Counter(b["status"] for b in self.batches.values())),
        }

    # -- batches ----------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        file_id = body.get("input_file_id")
        if file_id not in self.files or body.get("endpoint") != _CHAT:
            return error_response(
                400, "input_file_id must name an uploaded file; endpoint " + _CHAT
            )
        lines = len(self.files[file_id].splitlines())
        limit = self.settings.batch_max_lines
        if limit is not None and lines > limit:
            self.refused_batches += 1
            return error_response(
                400, f"batch is too large: {lines} requests, over the limit of {limit}"
            )
        batch_id = f"batch_{len(self.batches) + 1:06d}"
        self.batch_lines.append(lines)
        self.batches[batch_id] = _batch_object(batch_id, file_id, body, lines)
        self._started[batch_id] = time.monotonic()
        self._ordinal[batch_id] = len(self.batches)
        await asyncio.sleep(self.settings.batch_reply_delay_s)
        return json_response(self.batches[batch_id])

    async def _list_batches(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", "20"))
        newest_first = sorted(self.batches.values(), key=lambda b: b["id"], reverse=True)
        after = request.query.get("after")
        if after:
            newest_first = [b for b in newest_first if b["id"] < after]
        page = [self._advance(b["id"]) for b in newest_first[:limit]]
        return json_response(
            {"object": "list", "data": page, "has_more": len(newest_first) > limit}
        )

    async def _get(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        if batch_id not in self.batches:
            return error_response(404, "no such batch")
        return json_response(self._advance(batch_id))

    async def _cancel(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        if batch_id not in self.batches:
            return error_response(404, "no such batch")
        batch = self._advance(batch_id)
        if batch["status"] in _TERMINAL:
            return error_response(
                400, f"batch {batch_id} is {batch['status']} and cannot be cancelled"
            )
        self.cancel_requests += 1
        batch["status"] = "cancelling"
        self._cancelled_at[batch_id] = time.monotonic()
        return json_response(batch)

    async def _stats(self, _: web.Request) -> web.Response:
        return json_response(self.stats())

    # -- processing -----------------------------------------------------------------------------

    def _advance(self, batch_id: str) -> dict[str, Any]:
        """The batch as it is now: worked out once its delay has passed (or it was cancelled)."""
        batch = self.batches[batch_id]
        delay = self.settings.batch_delay_s
        if batch["status"] in _TERMINAL:
            return batch
        lines = [orjson.loads(raw) for raw in self.files[batch["input_file_id"]].splitlines()]
        if batch["status"] == "cancelling":
            ran = self._cancelled_at[batch_id] - self._started[batch_id]
            share = min(ran / delay, 1.0) if delay > 0 else 1.0
            self._finish(batch, lines, int(len(lines) * share), "cancelled", "batch_cancelled")
        elif time.monotonic() - self._started[batch_id] >= delay:
            if self._ordinal[batch_id] in self.settings.batch_expire:
                self._finish(batch, lines, len(lines) // 2, "expired", "batch_expired")
            else:
                self._finish(batch, lines, len(lines), "completed", "")
        return batch

    def _finish(
        self, batch: dict[str, Any], lines: list[dict[str, Any]], done: int, status: str, code: str
    ) -> None:
        output, errors = run_lines(lines, done, status, code, self.lines.run, self.fates)
        for name, entries in (("output_file_id", output), ("error_file_id", errors)):
            if entries:
                self._random.shuffle(entries)
                batch[name] = self.store.add_output(f"{batch['id']}_{name}.jsonl", entries)
        batch["status"] = status
        completed = len(output)
        batch["request_counts"] = {
            "total": len(lines),
            "completed": completed,
            "failed": min(done, len(lines)) - completed,
        }


class LineRunner:
    """Answers batch lines as the live endpoint would, but for the injected line failures."""

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator
        self.settings = simulator.settings
        self.line_attempts: Counter[str] = Counter()  # prompt → lines processed
        self.answered_by_prompt: Counter[str] = Counter()

    def run(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """What the live endpoint would answer, but for the injected line failures."""
        messages = body.get("messages") or []
        prompt = user_text(messages)
        self.line_attempts[prompt] += 1
        for marker, status, message in (
            ("[[sim:400]]", 400, "messages: this request was refused as invalid"),
            ("[[sim:402]]", 402, "Your credit balance is too low"),
        ):
            if marker in prompt:
                return status, error_body(message)
        s = self.settings
        h = digest(orjson.dumps(body), s.seed, "batch")
        if (h % 10_000) / 10_000 < s.batch_fail_share and self.line_attempts[prompt] == 1:
            return 500, error_body("simulated 500")
        # The live endpoint's own token count, so batch and live usage agree.
        prompt_tokens = self.simulator.count_prompt(messages)
        violate = violates_schema(s, messages, self.line_attempts[prompt])
        reply = build_reply(body, prompt, prompt_tokens, s.cached_share, violate=violate)
        self.answered_by_prompt[prompt] += 1
        return 200, reply


def run_lines(
    lines: list[dict[str, Any]],
    done: int,
    status: str,
    code: str,
    run_line: Callable[[dict[str, Any]], tuple[int, dict[str, Any]]],
    fates: dict[str, str],
) -> tuple[list[bytes], list[bytes]]:
    """The output and error entries of a batch's lines: the first ``done`` run, the rest
    never ran (the batch ended ``status``); each line's fate noted in ``fates``."""
    output: list[bytes] = []
    errors: list[bytes] = []
    for number, line in enumerate(lines):
        identifier = line["custom_id"]
        if number >= done:
            fates[identifier] = status
            message = f"this request did not run before the batch was {status}"
            entry = {"id": f"batch_req_{identifier}", "custom_id": identifier,
                     "response": None, "error": {"code": code, "message": message}}  # fmt: skip
            errors.append(orjson.dumps(entry))
            continue
        status_code, body = run_line(line["body"])
        fates[identifier] = "ok" if status_code == 200 else str(status_code)
        entry = {
            "id": f"batch_req_{identifier}",
            "custom_id": identifier,
            "response": {"status_code": status_code, "request_id": identifier, "body": body},
            "error": None,
        }
        (output if status_code == 200 else errors).append(orjson.dumps(entry))
    return output, errors


def _batch_object(batch_id: str, file_id: str, body: dict[str, Any], lines: int) -> dict[str, Any]:
    """A new batch as the Batch API describes it."""
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": _CHAT,
        "errors": None,
        "input_file_id": file_id,
        "completion_window": body.get("completion_window", "24h"),
        "status": "in_progress",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": int(time.time()),
        "request_counts": {"total": lines, "completed": 0, "failed": 0},
        "metadata": body.get("metadata"),
    }
