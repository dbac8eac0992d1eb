"""Images arrive as the gateway expects: MIME from the bytes, resized, in order, just in time."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from PIL import Image

from batcher.cli import main
from batcher.rows import images as images_module
from batcher.rows.request import RequestBuilder
from tests.conftest import SimFactory, write_job

HEIC_STUB = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64


def picture(path: Path, size: tuple[int, int], fmt: str, mode: str = "RGB", **options: Any) -> Path:
    Image.new(mode, size, (200, 120, 40, 255)[: len(mode)]).save(path, format=fmt, **options)
    return path


def image_job(tmp_path: Path, url: str, rows: list[dict[str, Any]], **sections: Any) -> Path:
    (tmp_path / "data.parquet").unlink(missing_ok=True)
    return write_job(
        tmp_path,
        url,
        data=pl.DataFrame(rows),
        fmt="parquet",
        input={"path": "data.parquet", "id_column": "id", "image_root": "pics"},
        request={"prompt": "Caption {{ id }}.", "images": ["photo"]},
        limits={"concurrency": 1},
        **sections,
    )


@pytest.fixture(autouse=True)
def without_pillow_heif(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI installs no HEIF decoder; tests behave the same whether this machine has one."""
    monkeypatch.setattr(images_module, "_register_heif", lambda: False)


@pytest.fixture
def pics(tmp_path: Path) -> Path:
    folder = tmp_path / "pics"
    folder.mkdir()
    return folder


def test_mime_comes_from_the_bytes(tmp_path: Path, pics: Path, sim_factory: SimFactory) -> None:
    server = sim_factory()
    picture(pics / "a.png", (64, 48), "PNG", "RGBA")
    picture(pics / "b.jpg", (64, 48), "JPEG")
    picture(pics / "c.webp", (64, 48), "WEBP")
    (pics / "d.heic").write_bytes(HEIC_STUB)
    picture(pics / "e.gif", (64, 48), "GIF", "P")
    picture(pics / "f.jpg", (64, 48), "PNG")  # a PNG with the wrong extension
    picture(pics / "g.bmp", (64, 48), "BMP")  # a photo without alpha: sent as JPEG
    rows = [
        {"id": name, "photo": name}
        for name in ["a.png", "b.jpg", "c.webp", "d.heic", "e.gif", "f.jpg", "g.bmp"]
    ]
    job = image_job(tmp_path, server.url, rows)
    assert main(["run", str(job), "--quiet"]) == 0
    seen = server.simulator.images
    assert [s["declared"] for s in seen] == [
        "image/png",
        "image/jpeg",
        "image/webp",
        "image/heic",
        "image/png",
        "image/png",
        "image/jpeg",
    ]
    assert all(s["declared"] == s["decoded"] for s in seen)
    assert seen[3]["bytes"] == len(HEIC_STUB)  # passed through untouched
    assert seen[0]["bytes"] == (pics / "a.png").stat().st_size


def test_large_image_is_downscaled_and_keeps_orientation(
    tmp_path: Path, pics: Path, sim_factory: SimFactory
) -> None:
    server = sim_factory()
    picture(pics / "big.jpg", (4000, 3000), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    picture(pics / "side.jpg", (3000, 2000), "JPEG", exif=exif)
    picture(pics / "alpha.png", (3000, 1000), "PNG", "RGBA")
    rows = [
        {"id": "big", "photo": "big.jpg"},
        {"id": "side", "photo": "side.jpg"},
        {"id": "alpha", "photo": "alpha.png"},
    ]
    job = image_job(tmp_path, server.url, rows)
    assert main(["run", str(job), "--quiet"]) == 0
    big, side, alpha = server.simulator.images
    assert (big["width"], big["height"]) == (1568, 1176)
    assert big["declared"] == "image/jpeg"
    assert (side["width"], side["height"]) == (1045, 1568)  # upright after EXIF rotation
    assert alpha["declared"] == "image/png"
    assert max(alpha["width"], alpha["height"]) == 1568


def test_max_bytes_forces_reencoding(tmp_path: Path, pics: Path, sim_factory: SimFactory) -> None:
    server = sim_factory()
    noisy = Image.effect_noise((1200, 1200), 100).convert("RGB")
    noisy.save(pics / "noise.jpg", quality=95)
    assert (pics / "noise.jpg").stat().st_size > 200_000
    job = image_job(
        tmp_path, server.url, [{"id": "n", "photo": "noise.jpg"}], images={"max_bytes": 200_000}
    )
    assert main(["run", str(job), "--quiet"]) == 0
    assert server.simulator.images[0]["bytes"] <= 200_000


def test_urls_pass_through_and_several_images_keep_their_order(
    tmp_path: Path, pics: Path, sim_factory: SimFactory
) -> None:
    server = sim_factory()
    picture(pics / "one.png", (10, 10), "PNG")
    picture(pics / "two.jpg", (10, 10), "JPEG")
    data_url = "data:image/png;base64," + base64.b64encode((pics / "one.png").read_bytes()).decode()
    url = "https://images.example.org/cat.webp?size=large&x=%20y"
    rows = [{"id": "r1", "photo": ["two.jpg", url, "one.png", data_url]}]
    job = image_job(tmp_path, server.url, rows)
    assert main(["run", str(job), "--quiet"]) == 0
    seen = server.simulator.images
    assert [s.get("declared") or s["url"] for s in seen] == [
        "image/jpeg",
        url,
        "image/png",
        "image/png",
    ]
    assert seen[3]["bytes"] == (pics / "one.png").stat().st_size


def test_missing_and_corrupt_images_fail_only_their_row(
    tmp_path: Path, pics: Path, sim_factory: SimFactory
) -> None:
    server = sim_factory()
    picture(pics / "good.png", (10, 10), "PNG")
    (pics / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    rows = [
        {"id": "ok", "photo": "good.png"},
        {"id": "missing", "photo": "nowhere.png"},
        {"id": "corrupt", "photo": "broken.jpg"},
    ]
    job = image_job(tmp_path, server.url, rows)
    assert main(["run", str(job), "--quiet"]) == 1
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    errors = dict(zip(out["id"], out["error"], strict=True))
    assert errors["ok"] is None
    assert errors["missing"] == "image_error: nowhere.png: file not found"
    assert errors["corrupt"].startswith("image_error: broken.jpg: not a readable image")
    assert server.simulator.requests == 1


def test_changed_image_is_sent_again_and_unchanged_is_not(
    tmp_path: Path, pics: Path, sim_factory: SimFactory
) -> None:
    server = sim_factory()
    picture(pics / "a.png", (10, 10), "PNG")
    picture(pics / "b.png", (10, 10), "PNG")
    job = image_job(
        tmp_path, server.url, [{"id": "a", "photo": "a.png"}, {"id": "b", "photo": "b.png"}]
    )
    assert main(["run", str(job), "--quiet"]) == 0
    assert main(["run", str(job), "--quiet"]) == 0
    assert server.simulator.requests == 2
    picture(pics / "b.png", (12, 10), "PNG")
    assert main(["run", str(job), "--quiet"]) == 0
    assert server.simulator.requests == 3


def test_heic_that_needs_resizing_asks_for_the_extra(
    tmp_path: Path, pics: Path, sim_factory: SimFactory
) -> None:
    server = sim_factory()
    (pics / "huge.heic").write_bytes(HEIC_STUB + b"\x00" * 5000)
    job = image_job(
        tmp_path, server.url, [{"id": "h", "photo": "huge.heic"}], images={"max_bytes": 4096}
    )
    assert main(["run", str(job), "--quiet"]) == 1
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert "pip install 'batcher[heif]'" in out["error"][0]
    assert server.simulator.requests == 0


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size in its header and holds no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def test_images_over_the_pixel_limit_fail_only_their_row(
    tmp_path: Path, pics: Path, sim_factory: SimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = sim_factory()
    # A small limit stands in for Pillow's ~89 million pixels: between it and twice it Pillow
    # only warns, above twice it raises; both fail the row, in any warning configuration.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    picture(pics / "good.png", (50, 50), "PNG")
    picture(pics / "warned.png", (150, 100), "PNG")
    picture(pics / "refused.png", (300, 100), "PNG")
    (pics / "claims.png").write_bytes(_png_header(100_000, 100_000))
    rows = [
        {"id": name, "photo": f"{name}.png"} for name in ("good", "warned", "refused", "claims")
    ]
    job = image_job(tmp_path, server.url, rows)
    assert main(["run", str(job), "--quiet"]) == 1
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    errors = dict(zip(out["id"], out["error"], strict=True))
    assert errors["good"] is None
    for name in ("warned", "refused", "claims"):
        assert errors[name].startswith(f"image_error: {name}.png: not a readable image (")
        assert "exceeds limit" in errors[name]
    assert server.simulator.requests == 1


def test_image_messages_carry_no_memory_addresses(
    tmp_path: Path, pics: Path, sim_factory: SimFactory
) -> None:
    server = sim_factory()
    (pics / "noise.png").write_bytes(b"neither a PNG nor anything else")
    job = image_job(tmp_path, server.url, [{"id": "n", "photo": "noise.png"}])
    assert main(["run", str(job), "--quiet"]) == 1
    error = pl.read_parquet(tmp_path / "out/result.parquet")["error"][0]
    assert error.startswith("image_error: noise.png: not a readable image (")
    assert error == "image_error: noise.png: not a readable image (cannot identify image file)"


def test_an_empty_or_null_image_cell_fails_its_row(
    tmp_path: Path, pics: Path, sim_factory: SimFactory
) -> None:
    server = sim_factory()
    picture(pics / "good.png", (10, 10), "PNG")
    rows: list[dict[str, Any]] = [
        {"id": "good", "photo": "good.png"},
        {"id": "null", "photo": None},
        {"id": "blank", "photo": ""},
    ]
    job = image_job(tmp_path, server.url, rows)
    assert main(["run", str(job), "--quiet"]) == 1
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    errors = dict(zip(out["id"], out["error"], strict=True))
    assert errors == {"good": None, "null": "image_error: empty", "blank": "image_error: empty"}
    assert server.simulator.requests == 1


def test_image_paths_stay_inside_the_image_root(
    tmp_path: Path, pics: Path, sim_factory: SimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = sim_factory()
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    picture(pics / "inside.png", (10, 10), "PNG")
    (pics / "sub").mkdir()
    picture(pics / "sub" / "deeper.png", (10, 10), "PNG")
    secret = picture(tmp_path / "secret.png", (10, 10), "PNG")
    picture(home / "private.png", (10, 10), "PNG")
    rows = [
        {"id": "inside", "photo": "inside.png"},
        {"id": "dotted", "photo": "sub/../sub/deeper.png"},
        {"id": "absolute-inside", "photo": str(pics / "inside.png")},
        {"id": "parent", "photo": "../secret.png"},
        {"id": "absolute", "photo": str(secret)},
        {"id": "home", "photo": "~/private.png"},
    ]
    job = image_job(tmp_path, server.url, rows)
    assert main(["run", str(job), "--quiet"]) == 1
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    errors = dict(zip(out["id"], out["error"], strict=True))
    assert errors["inside"] is None
    assert errors["dotted"] is None
    assert errors["absolute-inside"] is None
    assert errors["parent"] == (
        "image_error: ../secret.png: outside input.image_root "
        "(images.allow_outside_root: true allows it)"
    )
    assert errors["absolute"].startswith(f"image_error: {secret}: outside input.image_root")
    assert errors["home"].startswith("image_error: ~/private.png: outside input.image_root")
    assert server.simulator.requests == 3

    job = image_job(tmp_path, server.url, rows, images={"allow_outside_root": True})
    assert main(["run", str(job), "--quiet"]) == 0
    assert server.simulator.requests == 6


def test_a_rerun_and_the_output_rebuild_read_no_unchanged_image(
    tmp_path: Path, pics: Path, sim_factory: SimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = sim_factory()
    rows = [{"id": str(n), "photo": f"{n}.png"} for n in range(6)]
    for n in range(6):
        picture(pics / f"{n}.png", (16 + n, 10), "PNG")
    job = image_job(tmp_path, server.url, rows)
    assert main(["run", str(job), "--quiet"]) == 0
    before = pl.read_parquet(tmp_path / "out/result.parquet")

    # Every image is unchanged: neither the run nor the rebuild may read or hash one again,
    # nor render a request (both tell an unchanged row by its inputs' digest).
    def forbidden(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("an unchanged row was prepared again")

    monkeypatch.setattr(images_module.ImageLoader, "describe", forbidden)
    monkeypatch.setattr(RequestBuilder, "build", forbidden)
    assert main(["run", str(job), "--quiet"]) == 0
    assert server.simulator.requests == 6
    after = pl.read_parquet(tmp_path / "out/result.parquet")
    assert after.equals(before)
