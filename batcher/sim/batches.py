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
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import BodyPartReader, web

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
        self.files: dict[str, bytes] = {}
        self.file_objects: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._started: dict[str, float] = {}
        self._cancelled_at: dict[str, float] = {}
        self._ordinal: dict[str, int] = {}  # 1-based, in order of creation
        self._random = random.Random(self.settings.seed)
        self.uploaded: Counter[str] = Counter()  # custom_id → times uploaded
        self.uploaded_prompts: Counter[str] = Counter()
        self.line_attempts: Counter[str] = Counter()  # prompt → lines processed
        self.answered_by_prompt: Counter[str] = Counter()
        self.fates: dict[str, str] = {}  # custom_id → ok, 500, 400, expired, cancelled
        self.file_sizes: list[int] = []
        self.batch_lines: list[int] = []
        self.refused_uploads = 0
        self.refused_batches = 0
        self.cancel_requests = 0

    def register(self, app: web.Application) -> None:
        for prefix in ("/v1", ""):
            app.router.add_post(f"{prefix}/files", self._upload)
            app.router.add_get(f"{prefix}/files", self._list_files)
            app.router.add_get(f"{prefix}/files/{{file_id}}/content", self._content)
            app.router.add_post(f"{prefix}/batches", self._create)
            app.router.add_get(f"{prefix}/batches", self._list_batches)
            app.router.add_get(f"{prefix}/batches/{{batch_id}}", self._get)
            app.router.add_post(f"{prefix}/batches/{{batch_id}}/cancel", self._cancel)
        app.router.add_get("/sim/batches", self._stats)

    def stats(self) -> dict[str, Any]:
        return {
            "uploaded": dict(self.uploaded),
            "fates": self.fates,
            "file_sizes": self.file_sizes,
            "batch_lines": self.batch_lines,
            "refused_uploads": self.refused_uploads,
            "refused_batches": self.refused_batches,
            "cancel_requests": self.cancel_requests,
            "statuses": dict(Counter(b["status"] for b in self.batches.values())),
        }

    # -- files ----------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        reader = await request.multipart()
        purpose = filename = None
        content = b""
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.read()).decode()
            elif part.name == "file":
                filename = part.filename
                content = bytes(await part.read())
        if purpose != "batch" or filename is None:
            return _error(400, "the upload needs purpose=batch and a file")
        limit = self.settings.batch_max_file_bytes
        if limit is not None and len(content) > limit:
            self.refused_uploads += 1
            return _error(413, f"file is too large: {len(content)} bytes, over {limit}")
        file_id = f"file-{len(self.file_objects) + 1:06d}"
        self.files[file_id] = content
        self.file_sizes.append(len(content))
        for raw in content.splitlines():
            line = orjson.loads(raw)
            self.uploaded[line["custom_id"]] += 1
            self.uploaded_prompts[user_text(line["body"]["messages"])] += 1
        self.file_objects[file_id] = _file_object(file_id, filename, len(content), "batch")
        await asyncio.sleep(self.settings.batch_reply_delay_s)
        return _json(self.file_objects[file_id])

    async def _list_files(self, request: web.Request) -> web.Response:
        purpose = request.query.get("purpose")
        items = [f for f in self.file_objects.values() if purpose in (None, f["purpose"])]
        return _json({"object": "list", "data": items, "has_more": False})

    async def _content(self, request: web.Request) -> web.Response:
        content = self.files.get(request.match_info["file_id"])
        if content is None:
            return _error(404, "no such file")
        return web.Response(body=content, content_type="application/octet-stream")

    # -- batches ----------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        file_id = body.get("input_file_id")
        if file_id not in self.files or body.get("endpoint") != _CHAT:
            return _error(400, "input_file_id must name an uploaded file; endpoint " + _CHAT)
        lines = len(self.files[file_id].splitlines())
        limit = self.settings.batch_max_lines
        if limit is not None and lines > limit:
            self.refused_batches += 1
            return _error(400, f"batch is too large: {lines} requests, over the limit of {limit}")
        batch_id = f"batch_{len(self.batches) + 1:06d}"
        self.batch_lines.append(lines)
        self.batches[batch_id] = {
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
        self._started[batch_id] = time.monotonic()
        self._ordinal[batch_id] = len(self.batches)
        await asyncio.sleep(self.settings.batch_reply_delay_s)
        return _json(self.batches[batch_id])

    async def _list_batches(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", "20"))
        newest_first = sorted(self.batches.values(), key=lambda b: b["id"], reverse=True)
        after = request.query.get("after")
        if after:
            newest_first = [b for b in newest_first if b["id"] < after]
        page = [self._advance(b["id"]) for b in newest_first[:limit]]
        return _json({"object": "list", "data": page, "has_more": len(newest_first) > limit})

    async def _get(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        if batch_id not in self.batches:
            return _error(404, "no such batch")
        return _json(self._advance(batch_id))

    async def _cancel(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        if batch_id not in self.batches:
            return _error(404, "no such batch")
        batch = self._advance(batch_id)
        if batch["status"] in _TERMINAL:
            return _error(400, f"batch {batch_id} is {batch['status']} and cannot be cancelled")
        self.cancel_requests += 1
        batch["status"] = "cancelling"
        self._cancelled_at[batch_id] = time.monotonic()
        return _json(batch)

    async def _stats(self, _: web.Request) -> web.Response:
        return _json(self.stats())

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
        output: list[bytes] = []
        errors: list[bytes] = []
        completed = failed = 0
        for number, line in enumerate(lines):
            identifier = line["custom_id"]
            if number >= done:
                self.fates[identifier] = status
                message = f"this request did not run before the batch was {status}"
                entry = {"id": f"batch_req_{identifier}", "custom_id": identifier,
                         "response": None, "error": {"code": code, "message": message}}  # fmt: skip
                errors.append(orjson.dumps(entry))
                continue
            status_code, body = self._run_line(line["body"])
            self.fates[identifier] = "ok" if status_code == 200 else str(status_code)
            entry = {
                "id": f"batch_req_{identifier}",
                "custom_id": identifier,
                "response": {"status_code": status_code, "request_id": identifier, "body": body},
                "error": None,
            }
            if status_code == 200:
                completed += 1
                output.append(orjson.dumps(entry))
            else:
                failed += 1
                errors.append(orjson.dumps(entry))
        for name, entries in (("output_file_id", output), ("error_file_id", errors)):
            if entries:
                self._random.shuffle(entries)
                file_id = f"file-{len(self.file_objects) + 1:06d}"
                self.files[file_id] = b"\n".join(entries) + b"\n"
                self.file_objects[file_id] = _file_object(
                    file_id, f"{batch['id']}_{name}.jsonl", len(self.files[file_id]), "batch_output"
                )
                batch[name] = file_id
        batch["status"] = status
        batch["request_counts"] = {"total": len(lines), "completed": completed, "failed": failed}

    def _run_line(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """What the live endpoint would answer, but for the injected line failures."""
        messages = body.get("messages") or []
        prompt = user_text(messages)
        self.line_attempts[prompt] += 1
        for marker, status, message in (
            ("[[sim:400]]", 400, "messages: this request was refused as invalid"),
            ("[[sim:402]]", 402, "Your credit balance is too low"),
        ):
            if marker in prompt:
                return status, _error_body(message)
        s = self.settings
        h = digest(orjson.dumps(body), s.seed, "batch")
        if (h % 10_000) / 10_000 < s.batch_fail_share and self.line_attempts[prompt] == 1:
            return 500, _error_body("simulated 500")
        # The live endpoint's own token count, so batch and live usage agree.
        prompt_tokens = self.simulator.count_prompt(messages)
        reply = build_reply(body, prompt, prompt_tokens, s.cached_share)
        self.answered_by_prompt[prompt] += 1
        return 200, reply


def _file_object(file_id: str, filename: str, size: int, purpose: str) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": int(time.time()),
        "filename": filename,
        "purpose": purpose,
    }


def _error_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error"}}


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(_error_body(message)), content_type="application/json"
    )


def _json(data: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")
