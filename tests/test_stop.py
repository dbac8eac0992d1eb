"""Stopping a run: after the signal nothing is sent that was not in flight, and every answer the
server gave is in the journal. A real subprocess, signalled, against the simulator."""

from __future__ import annotations

import re
import signal
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import httpx
import polars as pl
import pytest

from batcher.cli import main
from batcher.errors import CheckpointError, KeyRefusedError
from batcher.runs.stopping import Interrupt, Stopping
from batcher.sim import SimulatorThread
from batcher.store.columns import Outcome
from batcher.store.journal import Journal
from tests.conftest import SimFactory, reviews, start, wait_for, write_job

ROWS = 3000


def stats(server: SimulatorThread) -> dict[str, Any]:
    return dict(httpx.get(server.url.removesuffix("/v1") + "/sim/stats").json())


def journal_rows(output: Path) -> tuple[int, int]:
    """Rows in the run's journal, and how many of them were answered."""
    path = output.with_name(output.name + ".checkpoint") / "journal.sqlite"
    connection = sqlite3.connect(path)
    try:
        rows, ok = connection.execute("SELECT count(*), total(ok) FROM outcomes").fetchone()
    finally:
        connection.close()
    return int(rows), int(ok)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_ends_dispatch_at_once_and_keeps_every_answer(
    tmp_path: Path, sim_factory: SimFactory, stop: signal.Signals
) -> None:
    # Replies take 0.3-0.5 s and the job paces 20 requests a second, so a few are in flight
    # and hundreds of workers (auto concurrency) wait for room or for the pace at any moment;
    # the signal comes a second into the pace (20 answers), with 3,000 rows still to go.
    server = sim_factory(latency_s=0.3, latency_jitter_s=0.2, seed=3)
    job = write_job(
        tmp_path,
        server.url,
        data=reviews(ROWS),
        limits={"concurrency": "auto", "requests_per_minute": 1200},
    )
    process = start(job)
    wait_for(lambda: server.simulator.answered >= 20 or process.poll() is not None)
    at_signal = stats(server)
    process.send_signal(stop)
    _, err = process.communicate(timeout=120)
    text = err.decode()
    assert process.returncode == 3, text
    assert f"stopped: interrupted by {stop.name}" in text
    wait_for(lambda: server.simulator.in_flight == 0)  # the server finished what it took
    final = stats(server)
    rows, ok = journal_rows(tmp_path / "out/result.parquet")
    figures = (
        f"requests at the signal {at_signal['requests']}, in the end {final['requests']}; "
        f"answered {final['answered']}, in the journal {rows} ({ok} ok)"
    )
    # Every reply the server gave (and would charge for) is committed: nothing is lost.
    assert final["answered"] == rows == ok, figures
    assert rows < ROWS, figures
    # The run says how many requests it had sent when it took the signal: the server saw
    # exactly those, so none left afterwards.
    notice = re.search(r"stopping; .*?(\d[\d,]*) requests in flight \(of (\d[\d,]*) sent\)", text)
    assert notice is not None, text
    in_flight, sent = (int(n.replace(",", "")) for n in notice.groups())
    assert final["requests"] == sent, f"{figures}; sent {sent}, {in_flight} in flight"


def test_a_row_stopped_midway_is_sent_again_even_with_skip_failed(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url, data=reviews(6))
    assert main(["run", str(job), "--quiet"]) == 0
    # As a stop leaves them: k00001 interrupted after a paid reply, k00002 finally failed.
    journal = tmp_path / "out/result.parquet.checkpoint/journal.sqlite"
    connection = sqlite3.connect(journal)
    with connection:
        for key, kind in (("k00001", "interrupted"), ("k00002", "http_400")):
            connection.execute(
                "UPDATE outcomes SET ok = 0, error_kind = ?, error = ? WHERE key = ?",
                (kind, f"{kind}: ...", key),
            )
    connection.close()
    assert main(["run", str(job), "--quiet", "--skip-failed"]) == 1  # k00002 stays failed
    assert server.simulator.requests == 6 + 1
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.filter(pl.col("error").is_not_null())["id"].to_list() == ["k00002"]


def marked_from(data: pl.DataFrame, first: int, marker: str) -> pl.DataFrame:
    """``data`` with ``marker`` on every row from ``first`` on: the simulator refuses those at
    once, while the rows before take their time."""
    texts = [f"{marker} {t}" if i >= first else t for i, t in enumerate(data["text"])]
    return data.with_columns(pl.Series("text", texts))


@pytest.mark.parametrize(
    ("marker", "said"),
    [("[[sim:401]]", "refused the API key"), ("[[sim:402]]", "cannot pay")],
    ids=["key-refused", "account"],
)
def test_a_refused_key_keeps_every_answer_in_flight(
    tmp_path: Path,
    sim_factory: SimFactory,
    capsys: pytest.CaptureFixture[str],
    marker: str,
    said: str,
) -> None:
    # The key is revoked after 24 requests: the 25th is refused at once while the requests
    # before it, 0.2-0.6 s each at concurrency 8, are still being answered (and charged for).
    server = sim_factory(latency_s=0.2, latency_jitter_s=0.4, seed=5)
    data = marked_from(reviews(200), 24, marker)
    job = write_job(tmp_path, server.url, data=data, limits={"concurrency": 8})
    assert main(["run", str(job), "--quiet"]) == 3
    err = capsys.readouterr().err
    stopped = [line for line in err.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1, err
    assert said in stopped[0], err
    wait_for(lambda: server.simulator.in_flight == 0)  # the server finished what it took
    rows, ok = journal_rows(tmp_path / "out/result.parquet")
    # Every answer the server sent is kept, committed and in the output: the requests before
    # the revocation (24, but for one sent after it came), several in flight when it came.
    answered = server.simulator.answered
    assert ok == answered, f"answered {answered}, kept {ok} ({rows} rows in the journal)"
    assert 16 < answered <= 24
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.filter(pl.col("error").is_null()).height == answered
    assert server.simulator.requests <= 24 + 8  # nothing sent after the refusal came


def test_the_budget_keeps_every_answer_in_flight(tmp_path: Path, sim_factory: SimFactory) -> None:
    """As for a refused key: dispatch stops, the requests in flight are answered and kept."""
    server = sim_factory(latency_s=0.2, latency_jitter_s=0.4, seed=5)
    job = write_job(
        tmp_path,
        server.url,
        data=reviews(200),
        limits={"concurrency": 8, "max_cost_usd": 0.002},
    )
    assert main(["run", str(job), "--quiet"]) == 3
    wait_for(lambda: server.simulator.in_flight == 0)
    _, ok = journal_rows(tmp_path / "out/result.parquet")
    assert 0 < ok == server.simulator.answered < 200


@pytest.mark.anyio
async def test_a_failed_journal_stops_the_work_at_once(tmp_path: Path) -> None:
    """Not at the next outcome recorded: when replies are slow, that may be seconds away."""
    stopping = Stopping(lambda _line: None)
    path = tmp_path / "journal.sqlite"
    journal = Journal(path, {"input": "data.csv", "output": "out.parquet", "key_column": "id"})
    stopping.watch(journal)
    other = sqlite3.connect(path)
    with other:
        other.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON outcomes "
            "BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END"
        )
    other.close()
    journal.record(Outcome.failed("a", b"f", "http_400", "refused", input_digest=None))
    with anyio.fail_after(30), stopping.work_scope:
        await anyio.sleep_forever()  # until the writer's failure cancels the work
    assert isinstance(stopping.abort, CheckpointError)
    assert "refused by a trigger" in str(stopping.abort)
    assert await anyio.to_thread.run_sync(journal.close) is stopping.abort


@pytest.mark.anyio
async def test_a_second_interrupt_abandons_work_whatever_stopped_the_run_first() -> None:
    lines: list[str] = []
    stopping = Stopping(lines.append)
    stopping.wind_down(KeyRefusedError("the server refused the API key", status=401), 10.0)

    def interrupted(name: str) -> Interrupt:
        return Interrupt(f"interrupted by {name}", f"{name}: stopping", 10.0)

    stopping.interrupt("SIGINT", interrupted)
    assert not stopping.work_scope.cancel_called  # the first one winds down
    stopping.interrupt("SIGINT", interrupted)
    assert stopping.work_scope.cancel_called
    assert lines == ["SIGINT: stopping", "second interrupt: abandoning requests in flight"]
    assert isinstance(stopping.abort, KeyRefusedError)  # the first reason is the one reported
