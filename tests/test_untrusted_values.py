"""Values the checkpoint cannot take as they come, end to end over loopback HTTP: input ids past
2**63 (a Parquet UInt64 column), replies whose values are objects or past 64 bits, and a
journal that starts refusing rows mid-run. Nothing paid for is lost, and nothing kept is paid
for twice."""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batcher.cli import main
from batcher.sim import SimulatorThread
from tests.conftest import (
    SimFactory,
    busy_job,
    rerun,
    reviews,
    run_sabotaged,
    start,
    wait_for,
    write_job,
)

ROWS = 2000


def big_ids(count: int) -> pl.Series:
    """UInt64 ids spread over the whole range: 0, 2**63 and 2**64 - 1 among them."""
    step = (2**64 - 1) // (count - 1)
    values = sorted({*(i * step for i in range(count - 2)), 2**63, 2**64 - 1})
    return pl.Series("id", values, dtype=pl.UInt64)


def committed(checkpoint: Path) -> int:
    connection = sqlite3.connect(checkpoint / "journal.sqlite")
    try:
        return int(connection.execute("SELECT count(*) FROM outcomes").fetchone()[0])
    finally:
        connection.close()


def test_uint64_ids_past_2_63_survive_a_kill_and_resume(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    ids = big_ids(ROWS)
    assert ids.max() == 2**64 - 1
    assert (ids >= 2**63).sum() > ROWS // 3
    data = reviews(ROWS).with_columns(ids)
    server = sim_factory(latency_s=0.01, latency_jitter_s=0.02, seed=7)
    job = write_job(
        tmp_path,
        server.url,
        data=data,
        fmt="parquet",
        limits={"concurrency": 16},
        output={"checkpoint_dir": "ck"},
    )
    process = start(job, capture=False)
    wait_for(lambda: server.simulator.answered > 400 or process.poll() is not None)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it was killed"
    wait_for(lambda: server.simulator.in_flight == 0)
    kept = committed(tmp_path / "ck")
    assert 0 < kept < ROWS
    answered = server.simulator.answered
    assert rerun(job) == 0
    # Nothing committed was sent again, and every row was answered in the end.
    assert server.simulator.answered - answered == ROWS - kept
    assert committed(tmp_path / "ck") == ROWS
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["id"].dtype == pl.UInt64
    assert out["id"].to_list() == ids.to_list()
    assert out["error"].null_count() == ROWS
    answered = server.simulator.answered
    assert main(["run", str(job), "--quiet"]) == 0
    assert server.simulator.answered == answered  # all done: nothing sent


def test_uint64_ids_with_a_list_of_models(tmp_path: Path, sim: SimulatorThread) -> None:
    ids = big_ids(30)
    data = reviews(30).with_columns(ids)
    models = ["claude-3-5-haiku-20241022", "claude-3-haiku-20240307"]
    job = write_job(tmp_path, sim.url, data=data, fmt="parquet", request={"model": models})
    assert main(["run", str(job), "--quiet"]) == 0
    assert main(["run", str(job), "--quiet"]) == 0
    assert sim.simulator.answered == 60  # the second run found every row done
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["id"].to_list() == [i for i in ids.to_list() for _ in models]


Change = Callable[[dict[str, Any]], None]


def serve_hostile(server: SimulatorThread, changes: dict[str, Change]) -> None:
    """The simulator's replies to prompts holding a marker, changed as ``changes`` says (as a
    hostile or broken server would send them)."""
    simulator = server.simulator
    build = simulator.build_reply

    def hostile(
        body: dict[str, Any], prompt: str, prompt_tokens: int, attempt: int = 1
    ) -> dict[str, Any]:
        reply = build(body, prompt, prompt_tokens, attempt)
        for marker, change in changes.items():
            if marker in prompt:
                change(reply)
        return reply

    simulator.build_reply = hostile  # type: ignore[method-assign]


def object_content(reply: dict[str, Any]) -> None:
    reply["choices"][0]["message"]["content"] = {"text": "an object"}


def object_id(reply: dict[str, Any]) -> None:
    reply["id"] = {"id": 1}


def huge_tokens(reply: dict[str, Any]) -> None:
    reply["usage"]["prompt_tokens"] = 2**63 + 1  # past SQLite's integers


HOSTILE: dict[str, Change] = {
    "<<object>>": object_content,
    "<<id>>": object_id,
    "<<tokens>>": huge_tokens,
}


def test_replies_the_journal_cannot_store_fail_their_rows_only(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    serve_hostile(server, HOSTILE)
    markers = list(HOSTILE)
    data = reviews(200)
    texts = [
        f"{markers[i // 10 % 3]} {text}" if i % 10 == 0 else text
        for i, text in enumerate(data["text"])
    ]
    job = write_job(tmp_path, server.url, data=data.with_columns(pl.Series("text", texts)))
    assert main(["run", str(job), "--quiet"]) == 1  # rows failed; the run did not stop
    assert "stopped" not in capsys.readouterr().err
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.height == 200  # every row kept, the 20 hostile ones as failed
    hostile = out.filter(pl.Series([i % 10 == 0 for i in range(200)]))
    errors = dict(zip(hostile["text"].to_list(), hostile["error"].to_list(), strict=True))
    for text, error in errors.items():
        if "<<tokens>>" in text:  # the reply's parser may take or refuse the count
            assert error is None or error.startswith("bad_reply: "), error
        else:
            assert (error or "").startswith("bad_reply: "), (text, error)
    assert out.filter(pl.col("error").is_null()).height >= 180
    requests = server.simulator.requests
    assert main(["run", str(job), "--quiet", "--skip-failed"]) == 1
    assert server.simulator.requests == requests  # nothing paid for twice


def test_a_journal_failing_mid_run_stops_it_naming_the_cause(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory(latency_s=0.02)
    job = busy_job(tmp_path, server.url, 300)
    checkpoint = tmp_path / "ck"

    def refuse_rows() -> None:  # a fault that is not a full disk, once rows were committed
        wait_for(lambda: committed(checkpoint) > 0)
        connection = sqlite3.connect(checkpoint / "journal.sqlite", timeout=30)
        with connection:
            connection.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON outcomes "
                "BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END"
            )
        connection.close()

    assert run_sabotaged(job, server, refuse_rows, after=60) == 3
    err = capsys.readouterr().err
    stopped = [line for line in err.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1, err
    assert "cannot write the checkpoint (refused by a trigger)" in stopped[0]
    assert "free space" not in err
    kept = committed(checkpoint)
    assert 0 < kept < 300
    assert pl.read_parquet(tmp_path / "out/result.parquet").height == kept
    connection = sqlite3.connect(checkpoint / "journal.sqlite")
    with connection:
        connection.execute("DROP TRIGGER refuse")
    connection.close()
    wait_for(lambda: server.simulator.in_flight == 0)
    answered = server.simulator.answered
    assert rerun(job) == 0
    assert server.simulator.answered - answered == 300 - kept
