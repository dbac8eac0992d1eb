"""`batcher preview`: the exact request bodies of a job's first rows, sending nothing.

Every pre-flight check of `batcher run` runs (the API key's excepted), then the first rows are
built as `run` builds them. Images are encoded as they would be sent (resized, re-encoded)
and shown as a short placeholder instead of their base64.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from PIL import Image, UnidentifiedImageError

from batcher.config import Job
from batcher.rows.images import ImageError, ImageLoader
from batcher.rows.plan import RowFailure, plan_job
from batcher.rows.request import ImagePart, RowRequest, with_image_urls
from batcher.send.parse import parser_for
from batcher.send.prices import PriceTable
from batcher.store.keys import normalise_keys
from batcher.store.output import layout_for

DEFAULT_ROWS = 3


@dataclass(frozen=True, slots=True)
class PreviewRow:
    """One request as `run` would send it (images as placeholders), or why the row fails."""

    key: Any
    body: dict[str, Any] | None
    estimated_tokens: int | None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "key": self.key,
            "body": self.body,
            "estimated_tokens": self.estimated_tokens,
        }
        if self.error is not None:
            shown["error"] = self.error
        return shown

    def lines(self) -> list[str]:
        if self.body is None:
            return [f"── {self.key}: fails before any request: {self.error}"]
        model = self.body.get("model")
        head = f"── {self.key} ({model}): about {self.estimated_tokens:,} tokens"
        return [head, orjson.dumps(self.body, option=orjson.OPT_INDENT_2).decode()]


def preview(job: Job, *, rows: int = DEFAULT_ROWS) -> list[PreviewRow]:
    """The requests of the first ``rows`` input rows (each model of a list); sends nothing."""
    plan = plan_job(job, limit=rows, api_key_required=False)
    # The output's checks (schema, parsed columns).
    layout_for(
        plan.output_rows(), parser_for(plan.job).columns, plan.job.config.request, plan.job.source
    )
    PriceTable.for_job(plan.job)  # and a run's: a budget needs its models' prices
    shown: list[PreviewRow] = []
    for batch in plan.batches():
        column = batch.get_column(plan.source.key_column)
        # Shown as the input has them (a UInt64 key is stored as a signed one).
        keys = column.to_list() if column.dtype.is_integer() else normalise_keys(column)
        row_keys = [key for key in keys for _ in plan.models]
        for key, (_, item, _) in zip(row_keys, plan.prepare(batch), strict=True):
            if isinstance(item, RowFailure):
                shown.append(PreviewRow(key, None, None, f"{item.kind}: {item.message}"))
            elif isinstance(item, RowRequest):
                try:
                    body = _with_placeholders(item, plan.images)
                except ImageError as exc:
                    shown.append(PreviewRow(key, None, None, f"image_error: {exc}"))
                    continue
                shown.append(PreviewRow(key, body, item.estimated_tokens))
    return shown


def _with_placeholders(request: RowRequest, images: ImageLoader) -> dict[str, Any]:
    if not request.images:
        return request.body
    return with_image_urls(
        request.body, {part.digest: _placeholder(part, images) for part in request.images}
    )


def _placeholder(part: ImagePart, images: ImageLoader) -> str:
    """``<image SOURCE, MIME, WxH px, N bytes>`` of the image as it would be sent."""
    if part.url is not None and not part.url.startswith("data:"):
        return part.url  # a URL goes as it is
    if part.url is not None:
        header, _, payload = images.encode(part).partition(",")  # re-encoded if over max_bytes
        try:
            data = base64.b64decode(payload)
        except (binascii.Error, ValueError):
            raise ImageError("data URL is not valid base64") from None
        source, mime = "data URL", header[5:].split(";")[0]
    else:
        path = Path(part.path or "")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"{path}: cannot read file: {exc.strerror}") from None
        mime, data = images.fit(str(path), raw)
        inside = path.is_relative_to(images.root)
        source = str(path.relative_to(images.root) if inside else path)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError):
        width, height = part.width, part.height  # HEIC without pillow-heif: the estimate's
    return f"<image {source}, {mime}, {width}x{height} px, {len(data)} bytes>"
