"""`batcher preview`: the bodies it prints are the ones `run` sends, and it sends nothing."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from PIL import Image

from batcher.cli import main
from batcher.sim import SimulatorThread
from tests.conftest import MODEL, SimFactory, write_job

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(
    r"<image (?P<source>.+), (?P<mime>\S+), (?P<w>\d+)x(?P<h>\d+) px, (?P<n>\d+) bytes>"
)


def stats(base_url: str) -> dict[str, Any]:
    return dict(httpx.get(base_url.removesuffix("/v1") + "/sim/stats").json())


def preview_json(capsys: pytest.CaptureFixture[str], *arguments: str) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert main(["preview", *arguments, "--json"]) == 0
    return list(json.loads(capsys.readouterr().out))


def image_facts(url: str) -> str:
    """A sent data URL as the facts the placeholder gives: MIME, pixel size, bytes."""
    header, _, payload = url.partition(",")
    data = base64.b64decode(payload)
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    return f"{header[5:].split(';')[0]} {width}x{height} {len(data)}"


def with_images(body: dict[str, Any], describe: Any) -> dict[str, Any]:
    """The body with every image part's URL passed through ``describe``."""
    messages = [dict(m) for m in body["messages"]]
    content = messages[-1]["content"]
    if isinstance(content, list):
        messages[-1]["content"] = [
            {"type": "image_url", "image_url": {"url": describe(p["image_url"]["url"])}}
            if p["type"] == "image_url"
            else p
            for p in content
        ]
    return {**body, "messages": messages}


def test_image_sample_bodies_equal_what_run_sends(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory(record_bodies=True)
    job = str(ROOT / "configs/caption_images.yaml")
    settings = [
        "--set",
        f"endpoint.base_url={server.url}",
        "--set",
        f"output.path={tmp_path / 'captions.parquet'}",
        "--set",
        "limits.concurrency=1",  # the simulator then sees the rows in input order
    ]
    shown = preview_json(capsys, job, *settings, "--limit", "100")
    assert stats(server.url)["requests"] == 0
    photos = pl.read_csv(ROOT / "sample_data/images.csv")
    assert [row["key"] for row in shown] == photos["photo_id"].to_list()

    assert main(["run", job, *settings, "--quiet"]) == 0
    seen = stats(server.url)
    sent = seen["bodies"]
    assert len(sent) == len(shown) == photos.height
    placeholders = []
    for row, body, photo in zip(shown, sent, photos["photo"].to_list(), strict=True):

        def facts(text: str, photo: str = photo) -> str:
            match = PLACEHOLDER.fullmatch(text)
            assert match is not None, text
            assert match["source"] == photo
            placeholders.append(match)
            return f"{match['mime']} {match['w']}x{match['h']} {match['n']}"

        assert with_images(row["body"], facts) == with_images(body, image_facts)
    # The simulator's own log of the images agrees: MIME, size and bytes after resizing.
    logged = [(i["declared"], i["width"], i["height"], i["bytes"]) for i in seen["images"]]
    assert logged == [(m["mime"], int(m["w"]), int(m["h"]), int(m["n"])) for m in placeholders]
    assert any(int(m["w"]) == 1568 for m in placeholders)  # the panorama was resized


def test_text_bodies_equal_what_run_sends_for_each_model(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory(record_bodies=True)
    job = str(ROOT / "configs/label_reviews.yaml")
    settings = [
        "--set",
        f"endpoint.base_url={server.url}",
        "--set",
        f"output.path={tmp_path / 'labels.parquet'}",
        "--set",
        "limits.concurrency=1",
        "--set",
        f"request.model=[{MODEL}, claude-sonnet-4-20250514]",
    ]
    shown = preview_json(capsys, job, *settings, "--limit", "4")
    assert stats(server.url)["requests"] == 0
    assert [row["key"] for row in shown] == [f"r000{i // 2}" for i in range(8)]
    assert [row["body"]["model"] for row in shown] == [MODEL, "claude-sonnet-4-20250514"] * 4
    assert all(row["estimated_tokens"] > 16 for row in shown)
    assert main(["run", job, *settings, "--limit", "4", "--quiet"]) == 0
    assert [row["body"] for row in shown] == stats(server.url)["bodies"]


def test_preview_needs_no_key_and_shows_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("BATCHER_API_KEY", raising=False)
    job = str(ROOT / "configs/label_reviews.yaml")
    out = ["--set", f"output.path={tmp_path / 'labels.parquet'}"]
    assert main(["run", job, *out, "--quiet"]) == 2  # run needs the key for the gateway
    capsys.readouterr()
    assert main(["preview", job, *out]) == 0
    text = capsys.readouterr().out
    assert text.count("── r000") == 3
    assert "Review: After two weeks of use it never worked at all." in text
    assert not (tmp_path / "labels.parquet").exists()


def test_preview_runs_the_pre_flight_checks(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, sim.url, request={"prompt": "{{ missing }}"})
    assert main(["preview", str(job)]) == 2
    assert "missing" in capsys.readouterr().err
    job = write_job(tmp_path, sim.url, name="json.yaml", output={"parse": "json"})
    assert main(["preview", str(job)]) == 2
    assert "output.schema" in capsys.readouterr().err
    assert stats(sim.url)["requests"] == 0


def test_preview_shows_rows_that_fail_before_sending(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    data = pl.DataFrame({"id": ["a", "b"], "photo": ["missing.png", ""]})
    job = write_job(
        tmp_path, sim.url, data=data, request={"prompt": "Describe.", "images": ["photo"]}
    )
    shown = preview_json(capsys, str(job))
    assert shown[0]["body"] is None
    assert shown[0]["error"].startswith("image_error: missing.png")
    assert shown[1]["body"] is None  # an empty image cell fails its row, as in a run
    assert shown[1]["error"] == "image_error: empty"
