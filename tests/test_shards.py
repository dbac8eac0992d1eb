"""Cutting the input into shards: in input order, the same every time, Parquet by row group;
and a shard's run as the driver interrupts it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import polars as pl
import pytest

from batcher.cli import main
from batcher.errors import InterruptedRunError
from batcher.rows.plan import plan_job
from batcher.runs.ray.shard import Interruption
from batcher.runs.ray.shards import cut, read_shard
from batcher.runs.shell import Run, RunOptions
from batcher.runs.summary import RunSummary
from tests.conftest import SimFactory, reviews, wait_for, write_job


def test_parquet_shards_end_on_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    reviews(100).write_parquet(path, row_group_size=30)
    sharded = cut(str(path), 50)
    # Groups of 30: a shard takes groups until it holds 50 rows or more.
    assert [(s.offset, s.rows) for s in sharded.shards] == [(0, 60), (60, 40)]
    assert [s.groups for s in sharded.shards] == [((0, (0, 1)),), ((0, (2, 3)),)]
    assert cut(str(path), 50) == sharded
    frames = [read_shard(sharded, shard, "id") for shard in sharded.shards]
    assert pl.concat(frames).equals(reviews(100))


def test_a_glob_of_files_is_one_input_in_order(tmp_path: Path) -> None:
    data = reviews(90)
    for number in range(3):
        data.slice(number * 30, 30).write_parquet(tmp_path / f"part-{number}.parquet")
    sharded = cut(str(tmp_path / "part-*.parquet"), 45)
    assert [(s.offset, s.rows) for s in sharded.shards] == [(0, 60), (60, 30)]
    frames = [read_shard(sharded, shard, "id") for shard in sharded.shards]
    assert pl.concat(frames).equals(data)


def test_csv_shards_hold_the_global_position_as_key(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    reviews(23).write_csv(path)
    sharded = cut(str(path), 10)
    assert [(s.offset, s.rows) for s in sharded.shards] == [(0, 10), (10, 10), (20, 3)]
    last = read_shard(sharded, sharded.shards[2], None)
    assert last.get_column("row_index").to_list() == [20, 21, 22]
    assert last.get_column("stars").dtype == pl.String  # as stored: dtypes apply later
    assert last.get_column("id").to_list() == ["k00020", "k00021", "k00022"]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("ray.shard_rows=0", "ray.shard_rows: Input should be greater than or equal to 1 (got 0)"),
        ("ray.workers=0", "ray.workers: Input should be greater than or equal to 1 (got 0)"),
        ("ray.nodes=3", "ray.nodes: unknown key"),
    ],
)
def test_the_ray_section_is_checked_like_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, message: str
) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9/v1")
    assert main(["run", str(job), "--ray", "--set", setting]) == 2
    assert capsys.readouterr().err == f"error: {job}: {message}\n"


def test_the_driver_s_interrupt_winds_a_shard_s_run_down(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    """What ``--ray``'s driver does to a shard's run when interrupted (no Ray needed): the
    run, in a thread of its own as on a worker, winds down as a signal would wind it down on
    one machine; every answer is kept. A run started after the interrupt stops at once."""
    server = sim_factory(latency_s=0.05)
    simulator = server.simulator
    assert simulator is not None
    job = write_job(tmp_path, server.url, data=reviews(200), limits={"concurrency": 4})
    interruption = Interruption()

    def shard_run() -> RunSummary:
        async def execute() -> RunSummary:
            run = Run(plan_job(job), RunOptions(quiet=True))
            with interruption.watching(run):
                return await run.execute(server.url)

        with ThreadPoolExecutor(1) as thread:
            return thread.submit(anyio.run, execute).result()

    def driver() -> None:
        wait_for(lambda: simulator.answered >= 10)
        interruption.interrupt("SIGTERM")

    interrupter = threading.Thread(target=driver)
    interrupter.start()
    summary = shard_run()
    interrupter.join()
    assert isinstance(summary.error, InterruptedRunError)
    assert summary.aborted == "interrupted by SIGTERM"
    assert 0 < summary.rows_ok < 200
    assert simulator.answered == summary.rows_ok  # what was in flight finished, and was kept

    sent = simulator.requests
    again = shard_run()
    assert isinstance(again.error, InterruptedRunError)
    assert simulator.requests == sent
    assert again.rows_ok == summary.rows_ok
