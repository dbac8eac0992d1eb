"""A job file from someone else runs no code and reads no secret; what a job writes never
lands on what it reads; one output path, one job; one server, one spelling."""

from __future__ import annotations

import base64
import os
import random
import sqlite3
from pathlib import Path

import polars as pl
import pytest
import yaml
from PIL import Image

from batcher.cli import main
from batcher.config import DEFAULT_BASE_URL, ImagesConfig, RequestConfig, normalise_base_url
from batcher.errors import ConfigError
from batcher.rows.images import ImageLoader
from batcher.rows.request import RequestBuilder
from batcher.sim import SimulatorThread
from tests.conftest import MODEL, SimFactory, reviews, write_job

SECRET = "s3cr3t-value-of-the-machine"


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("BATCHER_TEST_SECRET", SECRET)
    return SECRET


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# -- job files run no code ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["preview", "estimate", "run"])
@pytest.mark.parametrize("key", ["prompt", "system"])
@pytest.mark.parametrize("column", [False, True])
def test_the_cycler_payload_runs_no_command(
    tmp_path: Path,
    sim: SimulatorThread,
    capsys: pytest.CaptureFixture[str],
    command: str,
    key: str,
    column: bool,
) -> None:
    marker = tmp_path / "pwned"
    payload = f"{{% set x = cycler.__init__.__globals__.os.system('touch {marker}') %}}"
    data = reviews(5)
    if column:  # the input has a `cycler` column: the name alone is no longer refused
        data = data.with_columns(pl.lit("c").alias("cycler"))
    job = write_job(tmp_path, sim.url, data=data, request={key: payload + "{{ text }}"})
    assert main([command, str(job), *(["--quiet"] if command == "run" else [])]) == 2
    err = one_line_error(capsys)
    assert f"request.{key}" in err
    assert not marker.exists()
    assert sim.simulator.requests == 0


@pytest.mark.parametrize(
    "template",
    [
        "{{ cycler.__init__.__globals__.os.environ.BATCHER_TEST_SECRET }}",
        "{{ lipsum.__globals__['os'].environ }}",
        "{{ joiner | attr('__init__') }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ text.__class__.__mro__ }}",
        "{% include '/etc/passwd' %}",
        "{% import 'os' as os %}{{ os }}",
        "{% extends '/etc/hosts' %}",
    ],
)
def test_a_template_cannot_reach_python_or_the_machine(secret: str, template: str) -> None:
    with pytest.raises(ConfigError, match=r"request\.prompt: template error"):
        RequestBuilder(RequestConfig(model=MODEL, prompt=template), DEFAULT_BASE_URL)


@pytest.mark.parametrize("name", ["cycler", "joiner", "lipsum", "environ", "os", "config"])
def test_only_the_rows_columns_and_three_globals_are_visible(name: str) -> None:
    builder = RequestBuilder(RequestConfig(model=MODEL, prompt=f"{{{{ {name} }}}}"), "http://h")
    assert builder.columns == [name]  # a column the input must have, else exit 2
    kept = RequestBuilder(
        RequestConfig(
            model=MODEL,
            prompt="{% set ns = namespace(n=0) %}{% for i in range(3) %}{% set ns.n = ns.n + i %}"
            "{% endfor %}{{ ns.n }} {{ dict(a=1).a }} {{ text }}",
        ),
        "http://h",
    )
    assert kept.columns == ["text"]
    assert kept.build(0, {"text": "t"}).body["messages"][-1]["content"] == "3 1 t"


def test_a_struct_field_starting_with_an_underscore_is_a_value() -> None:
    builder = RequestBuilder(
        RequestConfig(model=MODEL, prompt="{{ meta._id }} {{ meta['_n'] }}"), "http://h"
    )
    body = builder.build(0, {"meta": {"_id": "x7", "_n": 3}}).body
    assert body["messages"][-1]["content"] == "x7 3"


def test_what_only_a_value_reveals_fails_that_row_alone(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    data = reviews(6).with_columns(
        pl.when(pl.col("id") == "k00003")
        .then(pl.lit("__init__"))
        .otherwise(pl.lit("upper"))
        .alias("method")
    )
    job = write_job(tmp_path, sim.url, data=data, request={"prompt": "{{ (text|attr(method))() }}"})
    assert main(["run", str(job), "--quiet"]) == 1
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    errors = dict(zip(out["id"], out["error"], strict=True))
    assert errors.pop("k00003").startswith("template_error: SecurityError")
    assert set(errors.values()) == {None}
    assert sim.simulator.requests == 5


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'x' * 10**10 }}",
        "{{ 10**100000 }}",
        "{{ [1] * 10**9 }}",
        "{{ self._TemplateReference__context }}",
        "{% set n = '__cla' ~ 'ss__' %}{{ meta[n] }}",
    ],
)
def test_the_sandbox_refuses_what_shows_only_when_rendered(template: str) -> None:
    builder = RequestBuilder(RequestConfig(model=MODEL, prompt=template), "http://h")
    failed = builder.render_error({"meta": "a string"})
    assert failed is not None
    assert type(failed[1]).__name__ == "SecurityError"


def test_env_is_expanded_only_in_the_keys_documented_for_it(
    tmp_path: Path, sim_factory: SimFactory, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = sim_factory(record_bodies=True)
    monkeypatch.setenv("BATCHER_TEST_OUT", "elsewhere")
    job = write_job(
        tmp_path,
        server.url,
        data=reviews(2),
        request={
            "prompt": "Echo ${BATCHER_TEST_SECRET} {{ text }}",
            "system": "${BATCHER_TEST_SECRET}",
            "extra_body": {"user": "${BATCHER_TEST_SECRET}"},
        },
        output={"path": "${BATCHER_TEST_OUT}/result.parquet"},
    )
    assert main(["run", str(job), "--quiet"]) == 0
    bodies = server.simulator.bodies
    assert len(bodies) == 2
    assert all(SECRET not in str(body) for body in bodies)
    assert bodies[0]["messages"][0]["content"] == "${BATCHER_TEST_SECRET}"
    assert bodies[0]["user"] == "${BATCHER_TEST_SECRET}"
    assert "Echo ${BATCHER_TEST_SECRET} " in bodies[0]["messages"][1]["content"]
    assert (tmp_path / "elsewhere/result.parquet").exists()  # a path key is expanded
    # --set goes by the same rule.
    assert main(["run", str(job), "--quiet", "--set", "request.prompt=${BATCHER_TEST_SECRET}"]) == 0
    assert all(SECRET not in str(body) for body in bodies)


# -- paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["same", "link", "dotted", "hard link"])
def test_an_output_that_is_the_input_is_refused(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    job = write_job(tmp_path, sim.url, fmt="parquet", input={"path": "data.parquet"})
    data = tmp_path / "data.parquet"
    before = data.read_bytes()
    output = {"same": "data.parquet", "dotted": "out/../data.parquet"}.get(how, "alias.parquet")
    if how == "link":
        (tmp_path / "alias.parquet").symlink_to(data)
    elif how == "hard link":
        os.link(data, tmp_path / "alias.parquet")
    job = write_job(
        tmp_path, sim.url, fmt="parquet", input={"path": "data.parquet"}, output={"path": output}
    )
    assert main(["run", str(job), "--quiet"]) == 2
    assert "output.path" in one_line_error(capsys)
    assert data.read_bytes() == before
    assert sim.simulator.requests == 0


def test_a_checkpoint_folder_on_the_input_is_refused(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, sim.url, output={"checkpoint_dir": "data.csv"})
    assert main(["run", str(job), "--quiet"]) == 2
    assert "output.checkpoint_dir" in one_line_error(capsys)


def test_an_output_matching_the_input_glob_is_refused(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "parts").mkdir()
    reviews(4).write_parquet(tmp_path / "parts/a.parquet")
    job = write_job(
        tmp_path,
        sim.url,
        input={"path": "parts/*.parquet"},
        output={"path": "parts/result.parquet"},
    )
    assert main(["run", str(job), "--quiet"]) == 2
    assert "matches input.path" in one_line_error(capsys)
    assert not (tmp_path / "parts/result.parquet").exists()


def test_an_output_path_holding_another_file_is_left_alone(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "pics").mkdir()
    image = tmp_path / "pics/photo.parquet"  # an input image, whatever its name
    Image.new("RGB", (8, 8)).save(image, format="PNG")
    before = image.read_bytes()
    job = write_job(tmp_path, sim.url, output={"path": "pics/photo.parquet"})
    assert main(["run", str(job), "--quiet"]) == 2
    assert "is not a Parquet file" in one_line_error(capsys)
    assert image.read_bytes() == before


def test_keep_done_needs_an_id_column(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, sim.url, input={"id_column": None})
    assert main(["run", str(job), "--quiet", "--keep-done"]) == 2
    assert "--keep-done needs input.id_column" in one_line_error(capsys)
    assert sim.simulator.requests == 0


# -- identity -------------------------------------------------------------------------------


def named(job: Path, name: str) -> Path:
    """``job`` with its ``name:`` set (write_job's ``name`` is the file's)."""
    config = yaml.safe_load(job.read_text())
    job.write_text(yaml.safe_dump({**config, "name": name}, sort_keys=False))
    return job


def test_two_jobs_cannot_share_an_output_path(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    first = named(write_job(tmp_path, sim.url, name="a.yaml"), "a")
    other = {"prompt": "Other {{ text }}"}
    second = named(write_job(tmp_path, sim.url, name="b.yaml", request=other), "b")
    assert main(["run", str(first), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(second), "--quiet"]) == 2
    err = one_line_error(capsys)
    assert "belongs to another job (name was 'a', now 'b')" in err
    assert main(["run", str(first), "--quiet"]) == 0
    assert sim.simulator.requests == 20  # a, b, a: paid once


def test_a_checkpoint_from_before_the_name_is_claimed(tmp_path: Path, sim: SimulatorThread) -> None:
    job = write_job(tmp_path, sim.url)
    assert main(["run", str(job), "--quiet"]) == 0
    journal = tmp_path / "out/result.parquet.checkpoint/journal.sqlite"
    with sqlite3.connect(journal) as connection:
        connection.execute("DELETE FROM meta WHERE name = 'name'")
    assert main(["run", str(job), "--quiet"]) == 0
    assert sim.simulator.requests == 20
    with sqlite3.connect(journal) as connection:
        stored = dict(connection.execute("SELECT name, value FROM meta").fetchall())
    assert stored["name"] == "test"


def test_one_server_under_two_spellings_is_not_asked_twice(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    assert sim.url.startswith("http://127.0.0.1:")
    shouting = "HTTP://LOCALHOST" + sim.url.removeprefix("http://127.0.0.1").rstrip("/") + "/"
    job = write_job(tmp_path, sim.url.replace("127.0.0.1", "localhost"))
    assert main(["run", str(job), "--quiet"]) == 0
    assert main(["run", str(job), "--quiet", "--set", f"endpoint.base_url={shouting}"]) == 0
    assert sim.simulator.requests == 20


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("HTTP://Host.Example/v1/", "http://host.example/v1"),
        ("https://h:443/v1", "https://h/v1"),
        ("http://h:80", "http://h"),
        ("http://[::1]:8080/v1//", "http://[::1]:8080/v1"),
        ("http://user:Pass@HOST/v1/?q=A/", "http://user:Pass@host/v1?q=A/"),
    ],
)
def test_base_urls_are_normalised(given: str, normal: str) -> None:
    assert normalise_base_url(given) == normal
    assert normalise_base_url(normal) == normal


@pytest.mark.parametrize(
    "url",
    [DEFAULT_BASE_URL, "http://127.0.0.1:8000/v1", "https://api.openai.com/v1", "http://h/A/B"],
)
def test_a_normal_base_url_keeps_its_fingerprints(url: str) -> None:
    """Existing checkpoints hold fingerprints of the URL as written: unchanged, not resent."""
    assert normalise_base_url(url) == url


# -- images ---------------------------------------------------------------------------------


def test_a_link_under_the_image_root_leading_out_fails_its_row(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    pics = tmp_path / "pics"
    pics.mkdir()
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    Image.new("RGB", (8, 8)).save(pics / "inside.png")
    (pics / "leak.png").symlink_to(secret)
    (pics / "folder").symlink_to(tmp_path)
    (pics / "alias.png").symlink_to(pics / "inside.png")
    rows = {
        "id": ["leak", "folder", "alias"],
        "photo": ["leak.png", "folder/secret.png", "alias.png"],
    }
    job = write_job(
        tmp_path,
        sim.url,
        data=pl.DataFrame(rows),
        input={"image_root": "pics"},
        request={"prompt": "Caption {{ id }}", "images": ["photo"]},
    )
    assert main(["run", str(job), "--quiet"]) == 1
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    errors = dict(zip(out["id"], out["error"], strict=True))
    assert errors == {
        "leak": "image_error: leak.png: outside input.image_root "
        "(images.allow_outside_root: true allows it)",
        "folder": "image_error: folder/secret.png: outside input.image_root "
        "(images.allow_outside_root: true allows it)",
        "alias": None,
    }
    assert sim.simulator.requests == 1


def noise_png(path: Path, side: int) -> Path:
    pixels = random.Random(side).randbytes(side * side * 3)
    Image.frombytes("RGB", (side, side), pixels).save(path, format="PNG")
    return path


def test_max_bytes_bounds_the_base64_sent(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory(record_bodies=True)
    (tmp_path / "pics").mkdir()
    image = noise_png(tmp_path / "pics/noise.png", 1192)
    assert 4_200_000 < image.stat().st_size < 5_000_000 < image.stat().st_size * 4 / 3
    job = write_job(
        tmp_path,
        server.url,
        data=pl.DataFrame({"id": ["n"], "photo": ["noise.png"]}),
        input={"image_root": "pics"},
        request={"prompt": "Caption {{ id }}", "images": ["photo"]},
        # aiohttp warns of a body over 1 MiB sent as bytes (an error under pytest's filter).
        endpoint={"transport": "httpx"},
    )
    assert main(["run", str(job), "--quiet"]) == 0
    url = server.simulator.bodies[0]["messages"][-1]["content"][1]["image_url"]["url"]
    payload = url.partition(",")[2]
    assert 3_000_000 < len(payload) <= ImagesConfig().max_bytes


def test_a_data_url_over_max_bytes_is_reencoded(tmp_path: Path) -> None:
    image = noise_png(tmp_path / "noise.png", 300)
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    loader = ImageLoader(tmp_path, ImagesConfig(max_bytes=100_000))
    described = loader.describe({"photo": url}, ["photo"])
    assert not isinstance(described, str)
    sent = loader.encode(described[0])
    assert len(url) > 100_000 >= len(sent.partition(",")[2])
    small = ImageLoader(tmp_path, ImagesConfig())
    described = small.describe({"photo": url}, ["photo"])
    assert not isinstance(described, str)
    assert small.encode(described[0]) == url  # within the limit: sent as it is
