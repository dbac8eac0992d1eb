"""The API key goes in the Authorization header and nowhere else; a refused key stops the job."""

from __future__ import annotations

from pathlib import Path

import httpx
import polars as pl
import pytest

from batcher.cli import main
from batcher.config import EndpointConfig
from batcher.send.attempt import AttemptError
from batcher.send.client import ChatClient
from batcher.sim import SimulatorThread
from tests.conftest import SimFactory, reviews, write_job

SECRET = "sk-test-SECRET-0123456789abcdef"


def all_written_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_key_only_in_authorization_header(
    tmp_path: Path,
    sim: SimulatorThread,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MY_KEY", SECRET)
    data = reviews(20)
    data = data.with_columns(data["text"].str.replace("review number 3 ", "[[sim:400]] "))
    job = write_job(tmp_path, sim.url, data=data, endpoint={"api_key_env": "MY_KEY"})
    assert main(["run", str(job)]) == 1  # one row refused with 400
    captured = capsys.readouterr()
    assert sim.simulator.authorization == {"bearer": 20}
    assert not key_seen(captured.out + captured.err)
    assert not key_seen(all_written_bytes(tmp_path))
    assert main(["status", str(job)]) == 0
    assert not key_seen(capsys.readouterr().out)


def test_refused_key_stops_the_job(
    tmp_path: Path,
    sim_factory: SimFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = sim_factory(latency_s=0.01)
    monkeypatch.setenv("MY_KEY", SECRET)
    data = reviews(500).with_columns(("[[sim:401]] " + reviews(500)["text"]).alias("text"))
    job = write_job(
        tmp_path,
        server.url,
        data=data,
        endpoint={"api_key_env": "MY_KEY"},
        limits={"concurrency": 4},
    )
    assert main(["run", str(job), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "refused the API key from $MY_KEY" in err
    assert not key_seen(err)
    assert server.simulator.requests <= 8  # stopped at once, not 500 attempts
    assert not key_seen(all_written_bytes(tmp_path))
    assert "resume with: batcher run" in err


def test_exhausted_balance_stops_the_job(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    data = reviews(200).with_columns(("[[sim:402]] " + reviews(200)["text"]).alias("text"))
    job = write_job(tmp_path, sim.url, data=data, limits={"concurrency": 2})
    assert main(["run", str(job), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "cannot pay" in err
    assert sim.simulator.requests <= 4


def key_seen(text: bytes | str, key: str = SECRET) -> bool:
    """Whether ``key`` is in ``text`` in any letter case."""
    raw = text.encode() if isinstance(text, str) else text
    return key.lower().encode() in raw.lower()


def with_marker(data: pl.DataFrame, markers: dict[int, str]) -> pl.DataFrame:
    texts = [f"{markers[i]} {t}" if i in markers else t for i, t in enumerate(data["text"])]
    return data.with_columns(pl.Series("text", texts))


@pytest.mark.parametrize(
    ("transport", "stream"), [("aiohttp", False), ("httpx", False), ("httpx", True)]
)
def test_key_echoed_by_the_server_is_redacted_everywhere(
    tmp_path: Path,
    sim: SimulatorThread,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    transport: str,
    stream: bool,
) -> None:
    # A CRLF .env: the key arrives with "\r\n", which is stripped, not sent or quoted.
    monkeypatch.setenv("MY_KEY", SECRET + "\r\n")
    markers = {2: "[[sim:echo400]]", 5: "[[sim:echo200]]", 7: "[[sim:echostream]]"}
    job = write_job(
        tmp_path,
        sim.url,
        data=with_marker(reviews(12), markers),
        endpoint={"api_key_env": "MY_KEY", "transport": transport},
        request={"stream": stream},
        retry={"max_attempts": 2},
    )
    assert main(["run", str(job), "--quiet"]) == 1
    assert main(["status", str(job)]) == 0
    captured = capsys.readouterr()
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    errors = {r["id"]: r["error"] for r in out.iter_rows(named=True) if r["error"]}
    expected = {"k00002", "k00005"} | ({"k00007"} if stream else set())
    assert set(errors) == expected
    assert all("***" in error for error in errors.values()), errors  # the echo did arrive
    assert sim.simulator.authorization["bearer"] == sim.simulator.requests
    assert not key_seen(captured.out + captured.err)
    assert not key_seen(all_written_bytes(tmp_path))


def test_key_with_a_control_character_is_refused_before_sending(
    tmp_path: Path,
    sim: SimulatorThread,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = "sk-test-\x01SECRET-é"
    monkeypatch.setenv("MY_KEY", key)
    job = write_job(tmp_path, sim.url, endpoint={"api_key_env": "MY_KEY"})
    assert main(["run", str(job), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "endpoint.api_key_env: the key in $MY_KEY contains" in err
    assert not key_seen(err, key)
    assert "SECRET" not in err
    assert sim.simulator.requests == 0


@pytest.mark.anyio
async def test_transport_error_text_is_redacted() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"proxy refused header {request.headers['Authorization'].upper()}")

    endpoint = EndpointConfig(base_url="http://127.0.0.1:9/v1", transport="httpx")
    async with ChatClient(endpoint, SECRET, 1) as client:
        client._transport = httpx.MockTransport(refuse)
        with pytest.raises(AttemptError) as caught:
            await client.complete({"model": "m", "messages": []})
    assert caught.value.kind == "connection"
    assert "proxy refused header BEARER ***" in str(caught.value)
    assert not key_seen(str(caught.value))


def test_words_about_credit_or_billing_do_not_stop_the_job(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    markers = {3: "[[sim:credit400]]", 6: "[[sim:billing503]]"}
    job = write_job(
        tmp_path, sim.url, data=with_marker(reviews(20), markers), retry={"max_attempts": 3}
    )
    assert main(["run", str(job), "--quiet"]) == 1
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    failed = {r["id"]: (r["error"], r["attempts"]) for r in out.iter_rows(named=True) if r["error"]}
    assert failed == {
        "k00003": ("http_400: a review about a credit card balance", 1),
        "k00006": ("http_503: billing service unavailable", 3),
    }
    assert out.height == 20
    assert "stopped:" not in capsys.readouterr().err


@pytest.mark.parametrize("marker", ["[[sim:quota429]]", "[[sim:billing400]]"])
def test_quota_and_billing_codes_stop_the_job(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str], marker: str
) -> None:
    server = sim_factory(latency_s=0.01)
    data = reviews(200).with_columns((f"{marker} " + pl.col("text")).alias("text"))
    job = write_job(tmp_path, server.url, data=data, limits={"concurrency": 2})
    assert main(["run", str(job), "--quiet"]) == 3
    assert "cannot pay" in capsys.readouterr().err
    assert server.simulator.requests <= 4
