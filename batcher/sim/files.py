"""The simulator's ``/files``: uploads of batch input, their listing and their content."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import BodyPartReader, web

from batcher.sim.replies import user_text

if TYPE_CHECKING:
    from batcher.sim.server import SimSettings


class FileStore:
    """Files uploaded and written (batch output), and what the uploads held."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.reset()

    def reset(self) -> None:
        """Forget every file; the routes keep reaching this store."""
        self.files: dict[str, bytes] = {}
        self.file_objects: dict[str, dict[str, Any]] = {}
        self.uploaded: Counter[str] = Counter()  # custom_id → times uploaded
        self.uploaded_prompts: Counter[str] = Counter()
        self.file_sizes: list[int] = []
        self.refused_uploads = 0

    def add_output(self, filename: str, entries: list[bytes]) -> str:
        """Store a batch's output or error file; its id."""
        file_id = f"file-{len(self.file_objects) + 1:06d}"
        self.files[file_id] = b"\n".join(entries) + b"\n"
        size = len(self.files[file_id])
        self.file_objects[file_id] = file_object(file_id, filename, size, "batch_output")
        return file_id

    async def upload(self, request: web.Request) -> web.Response:
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
            return error_response(400, "the upload needs purpose=batch and a file")
        limit = self.settings.batch_max_file_bytes
        if limit is not None and len(content) > limit:
            self.refused_uploads += 1
            return error_response(413, f"file is too large: {len(content)} bytes, over {limit}")
        file_id = f"file-{len(self.file_objects) + 1:06d}"
        self.files[file_id] = content
        self.file_sizes.append(len(content))
        for raw in content.splitlines():
            line = orjson.loads(raw)
            self.uploaded[line["custom_id"]] += 1
            self.uploaded_prompts[user_text(line["body"]["messages"])] += 1
        self.file_objects[file_id] = file_object(file_id, filename, len(content), "batch")
        await asyncio.sleep(self.settings.batch_reply_delay_s)
        return json_response(self.file_objects[file_id])

    async def list_files(self, request: web.Request) -> web.Response:
        purpose = request.query.get("purpose")
        items = [f for f in self.file_objects.values() if purpose in (None, f["purpose"])]
        return json_response({"object": "list", "data": items, "has_more": False})

    async def content(self, request: web.Request) -> web.Response:
        content = self.files.get(request.match_info["file_id"])
        if content is None:
            return error_response(404, "no such file")
        return web.Response(body=content, content_type="application/octet-stream")


def file_object(file_id: str, filename: str, size: int, purpose: str) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": int(time.time()),
        "filename": filename,
        "purpose": purpose,
    }


def error_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error"}}


def error_response(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(error_body(message)), content_type="application/json"
    )


def json_response(data: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")
