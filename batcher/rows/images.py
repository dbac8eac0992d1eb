"""Images of a row: find them, fingerprint them by content, and encode them just in time.

``describe`` runs while a batch is prepared (in a worker thread): it hashes each local file and
reads its header for the token estimate, but keeps no pixels. ``encode`` runs in a worker thread
right before the request is sent, so at most ``concurrency`` images are in memory at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from batcher.config import ImagesConfig
from batcher.rows.request import ImagePart, RowRequest, with_image_urls

ACCEPTED = frozenset({"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"})
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis"})
_HEIF_BRANDS = frozenset({b"mif1", b"msf1", b"heif"})
_JPEG_QUALITIES = (90, 80, 70, 60, 50, 40)
# Folders whose real path one loader remembers (images usually share a few folders).
_FOLDERS_KEPT = 4096
# Pillow names its buffer in some messages ("<_io.BytesIO object at 0x7f...>"): noise that
# differs per run and says nothing to the reader.
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")
# Pillow warns (not raises) between MAX_IMAGE_PIXELS and twice that; the warning filter is
# process-wide state, so the few lines that turn it into an error run one thread at a time.
_WARNINGS_LOCK = threading.Lock()
# What Pillow raises for an image it cannot or will not decode: each fails its row alone.
_UNREADABLE = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


class ImageError(Exception):
    """An image of a row cannot be sent; the message is ``<path>: <reason>``."""


def sniff_mime(head: bytes) -> str | None:
    """The MIME type from the file's first bytes (its magic number), never its name."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIC_BRANDS:
            return "image/heic"
        if brand in _HEIF_BRANDS:
            return "image/heif"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:2] == b"BM":
        return "image/bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return None


def _register_heif() -> bool:
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


class ImageLoader:
    """One job's image settings and root folder."""

    def __init__(self, root: Path, config: ImagesConfig) -> None:
        self.root = root
        self.config = config
        self._settings = f"edge={config.max_edge_px};bytes={config.max_bytes}"
        self.heif_available = _register_heif()
        self._real_root = os.path.realpath(root)
        self._folders: dict[str, str] = {}  # folder → its real path (``_real``)

    # -- preparing (fingerprint and token estimate) -----------------------------------------

    def signature(self, row: dict[str, Any], columns: Iterable[str]) -> str:
        """What decides the row's images without reading them: each reference, and for a
        local file its size and modification time (as make and rsync judge a file), with the
        settings that shape what is sent. Equal signatures, equal images; a file that cannot
        be looked at signs as missing, so the row is prepared in full and fails there."""
        parts = [self._settings]
        for column in columns:
            value = row.get(column)
            for item in value if isinstance(value, list) else [value]:
                reference = "" if item is None else str(item)
                parts.append(reference)
                if reference[:8].lower().startswith(("http://", "https://", "data:")):
                    continue
                try:
                    stat = self.resolve(reference).stat() if reference.strip() else None
                except (ImageError, OSError):
                    stat = None
                parts.append(f"{stat.st_size}:{stat.st_mtime_ns}" if stat else "missing")
        return "\x1f".join(parts)

    def describe(self, row: dict[str, Any], columns: Iterable[str]) -> tuple[ImagePart, ...] | str:
        """The row's images in column order, or the ``image_error`` message of the first bad one."""
        parts: list[ImagePart] = []
        for column in columns:
            value = row.get(column)
            values = value if isinstance(value, list) else [value]
            if not values:
                return "empty"
            for item in values:
                if item is None or (isinstance(item, str) and not item.strip()):
                    return "empty"  # sending the row without its image would answer wrongly
                try:
                    parts.append(self._describe_one(str(item)))
                except ImageError as exc:
                    return str(exc)
        return tuple(parts)

    def _describe_one(self, reference: str) -> ImagePart:
        lowered = reference[:8].lower()
        if lowered.startswith(("http://", "https://")):
            edge = self.config.max_edge_px or 1568
            return ImagePart(url=reference, digest=reference, width=edge, height=edge)
        if lowered.startswith("data:"):
            return self._describe_data_url(reference)
        path = self.resolve(reference)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageError(f"{reference}: file not found") from None
        except OSError as exc:
            raise ImageError(f"{reference}: cannot read file: {exc.strerror}") from None
        width, height = self._dimensions(reference, data)
        digest = f"sha256:{hashlib.sha256(data).hexdigest()};{self._settings}"
        return ImagePart(path=str(path), digest=digest, width=width, height=height)

    def _describe_data_url(self, url: str) -> ImagePart:
        _, _, payload = url.partition(",")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError(f"{url[:40]}…: data URL is not valid base64") from None
        width, height = self._dimensions(url[:40] + "…", data)
        digest = f"sha256:{hashlib.sha256(url.encode()).hexdigest()}"
        if len(payload) > self.config.max_bytes:  # re-encoded to fit when sent, as a file is
            digest += f";{self._settings}"
        return ImagePart(url=url, digest=digest, width=width, height=height)

    def resolve(self, reference: str) -> Path:
        """The file a cell names, which must lie inside the image root unless the job allows
        otherwise: an input from elsewhere must not send any file of this machine."""
        path = Path(reference).expanduser()
        full = path if path.is_absolute() else self.root / path
        if self.config.allow_outside_root:
            return full
        # Links resolved first: a link inside the root may lead anywhere. The path returned,
        # the one read, is the resolved one that was checked.
        inside = self._real(full)
        if os.path.commonpath([self._real_root, inside]) != self._real_root:
            raise ImageError(
                f"{reference}: outside input.image_root (images.allow_outside_root: true allows it)"
            )
        return Path(inside)

    def _real(self, path: Path) -> str:
        """``path`` with every link resolved. ``os.path.realpath`` takes 40 µs (an lstat per
        folder level); a row's folder is resolved once per run, and the file itself is one
        lstat, so a million rows' signatures cost seconds, not minutes."""
        folder, name = os.path.split(os.path.normpath(path))
        real = self._folders.get(folder)
        if real is None:
            if len(self._folders) >= _FOLDERS_KEPT:
                self._folders.clear()
            real = self._folders[folder] = os.path.realpath(folder)
        candidate = os.path.join(real, name)
        return os.path.realpath(candidate) if os.path.islink(candidate) else candidate

    def _dimensions(self, name: str, data: bytes) -> tuple[int, int]:
        """Size after the configured downscale; checks the file is a readable image."""
        mime = sniff_mime(data[:16])
        if mime in ("image/heic", "image/heif") and not self.heif_available:
            edge = self.config.max_edge_px or 1568
            return edge, edge  # cannot read the header without pillow-heif: assume the cap
        try:
            with _open(data) as image:
                width, height = image.size
                image.verify()
        except _UNREADABLE as exc:
            raise ImageError(f"{name}: not a readable image ({_reason(exc)})") from None
        return _fit(width, height, self.config.max_edge_px)

    # -- sending -----------------------------------------------------------------------------

    def encode(self, part: ImagePart) -> str:
        """The URL to send for one image part (blocking: call from a worker thread)."""
        if part.url is not None:
            header, _, payload = part.url.partition(",")
            if header[:5].lower() != "data:" or len(payload) <= self.config.max_bytes:
                return part.url
            mime, encoded = self.fit(part.url[:40] + "…", base64.b64decode(payload))
            return f"data:{mime};base64,{base64.b64encode(encoded).decode('ascii')}"
        if part.path is None:  # pragma: no cover - describe always sets one of them
            raise ImageError("image part has neither a URL nor a path")
        try:
            data = Path(part.path).read_bytes()
        except OSError as exc:
            raise ImageError(f"{part.path}: cannot read file: {exc.strerror}") from None
        mime, encoded = self.fit(part.path, data)
        return f"data:{mime};base64,{base64.b64encode(encoded).decode('ascii')}"

    def fit(self, name: str, data: bytes) -> tuple[str, bytes]:
        """``(mime, bytes)`` to send: untouched when accepted and within limits, else re-encoded."""
        mime = sniff_mime(data[:16])
        max_edge = self.config.max_edge_px
        if mime in ("image/heic", "image/heif") and not self.heif_available:
            if self._fits(data):
                return mime, data
            raise ImageError(
                f"{name}: this HEIC/HEIF image must be resized, which needs pillow-heif: "
                "pip install 'batcher[heif]'"
            )
        try:
            image = _open(data)  # reads the header only
            too_big = max_edge is not None and max(image.size) > max_edge
            if mime in ACCEPTED and not too_big and self._fits(data):
                return mime or "image/png", data
            if max_edge is not None and image.format == "JPEG":
                # Let the JPEG decoder scale down by 1/2, 1/4 or 1/8 where the result still
                # covers the target: a quarter of the pixels to decode and hold, or fewer.
                image.draft("RGB", _fit(image.width, image.height, max_edge))
            image.load()
            return self._reencode(name, image, mime)
        except _UNREADABLE as exc:
            raise ImageError(f"{name}: not a readable image ({_reason(exc)})") from None

    def _fits(self, data: bytes) -> bool:
        """Whether ``data`` is within ``images.max_bytes`` as sent: as base64 (4 characters
        per 3 bytes), which is what the provider measures (a 4.26 MB file is 5.67 MB sent)."""
        return 4 * ((len(data) + 2) // 3) <= self.config.max_bytes

    def _reencode(self, name: str, image: Image.Image, mime: str | None) -> tuple[str, bytes]:
        image = ImageOps.exif_transpose(image)
        max_edge = self.config.max_edge_px
        if max_edge is not None and max(image.size) > max_edge:
            image.thumbnail((max_edge, max_edge), Image.Resampling.LANCZOS)
        has_alpha = image.mode in ("RGBA", "LA", "PA") or (
            image.mode == "P" and "transparency" in image.info
        )
        if mime == "image/png" or has_alpha or image.mode in ("P", "1"):
            target = "PNG"
        elif mime == "image/webp":
            target = "WEBP"
        else:
            target = "JPEG"
        while True:
            for quality in _JPEG_QUALITIES if target != "PNG" else (None,):
                encoded = _save(image, target, quality)
                if self._fits(encoded):
                    return f"image/{target.lower()}", encoded
            if min(image.size) <= 16:
                raise ImageError(f"{name}: cannot fit in images.max_bytes={self.config.max_bytes}")
            image = image.resize(
                (max(1, image.width * 3 // 4), max(1, image.height * 3 // 4)),
                Image.Resampling.LANCZOS,
            )


def _open(data: bytes) -> ImageFile.ImageFile:
    """Open (header only), with Pillow's decompression-bomb warning raised as an error, so an
    image over the pixel limit fails its row the same way in every process."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _save(image: Image.Image, target: str, quality: int | None) -> bytes:
    buffer = io.BytesIO()
    if target == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    if target == "PNG" and image.mode not in ("RGB", "RGBA", "L", "LA", "P", "1"):
        image = image.convert("RGBA")
    options: dict[str, Any] = {"optimize": True} if target == "PNG" else {"quality": quality}
    image.save(buffer, format=target, **options)
    return buffer.getvalue()


def _fit(width: int, height: int, max_edge: int | None) -> tuple[int, int]:
    if max_edge is None or max(width, height) <= max_edge:
        return width, height
    scale = max_edge / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _reason(exc: BaseException) -> str:
    text = _OBJECT_REPR.sub("", str(exc)).strip()
    return text or type(exc).__name__


def inline_images(request: RowRequest, loader: ImageLoader) -> dict[str, Any]:
    """The body with each local image's data URL in place of its digest (blocking).

    Raises ImageError for a file that is missing or cannot be encoded.
    """
    return with_image_urls(request.body, {p.digest: loader.encode(p) for p in request.images})
