"""What the simulator makes of a request's prompt: its tokens, and each image as it arrived.

Images are identified by decoding them (Pillow), never by the client's own code: a test that
compares what the client declared with what the server found checks two independent readings.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image, UnidentifiedImageError

from batcher.sim.replies import count_tokens

_DECODED = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
# ISO-BMFF brands of HEIC/HEIF stills: without pillow-heif the server cannot decode them.
_HEIF_BRANDS = {b"heic": "image/heic", b"heix": "image/heic", b"mif1": "image/heif"}


def count_prompt(messages: list[dict[str, Any]], images: list[dict[str, Any]]) -> int:
    """Prompt tokens of ``messages``; each image part is described onto ``images``."""
    tokens = 0
    for message in messages:
        content = message.get("content")
        tokens += 3
        if isinstance(content, str):
            tokens += count_tokens(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                tokens += count_tokens(part.get("text", ""))
            elif part.get("type") == "image_url":
                entry = describe_image(str((part.get("image_url") or {}).get("url", "")))
                images.append(entry)
                width, height = entry.get("width", 0), entry.get("height", 0)
                # As Anthropic bills an image; an unseen (remote) one as a large photo.
                tokens += max(1, width * height // 750) if width else 1600
    return tokens


def describe_image(url: str) -> dict[str, Any]:
    """A data URL's declared type, the type its bytes decode as, its size and dimensions;
    a remote URL as it is."""
    if not url.startswith("data:"):
        return {"url": url}
    header, _, payload = url.partition(",")
    data = base64.b64decode(payload)
    entry: dict[str, Any] = {"url": None, "declared": header[5:].split(";")[0], "bytes": len(data)}
    try:
        with Image.open(io.BytesIO(data)) as image:
            entry.update(
                decoded=_DECODED.get(str(image.format)), width=image.width, height=image.height
            )
    except (UnidentifiedImageError, OSError, ValueError):
        brand = _HEIF_BRANDS.get(data[8:12]) if data[4:8] == b"ftyp" else None
        entry.update(decoded=brand, width=0, height=0)
    return entry
