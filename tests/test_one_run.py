"""The promises every mode keeps, because every mode runs in the one run shell: one identity
for the checkpoint, one lock, the output target checked before anything is sent."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batcher.cli import main
from batcher.send.prices import PriceTable
from tests.conftest import MODEL, reviews, start, wait_for, write_job


def test_live_then_batch_then_live_resumes_without_resending(
    tmp_path: Path, sim_factory: Any
) -> None:
    data = reviews(60)
    server = sim_factory()
    job = write_job(tmp_path, server.url, data=data, batch={"poll_s": 0.05})
    assert main(["run", str(job), "--quiet", "--limit", "20"]) == 0
    assert server.simulator.answered == 20

    # Batch mode takes the live checkpoint as its own and submits only the other 40 rows.
    assert main(["run", str(job), "--quiet", "--set", "endpoint.mode=batch"]) == 0
    service = server.simulator.batches
    assert sum(service.batch_lines) == 40
    assert sum(service.answered_by_prompt.values()) == 40

    # Back to live: everything is answered, nothing is sent again.
    assert main(["run", str(job), "--quiet"]) == 0
    assert server.simulator.answered == 20
    assert sum(service.batch_lines) == 40
    output = pl.read_parquet(tmp_path / "out/result.parquet")
    assert output.get_column("id").to_list() == data.get_column("id").to_list()
    assert output.get_column("error").null_count() == 60
    # Each row keeps the answer first paid for: at list price for the first 20, batch for the rest.
    price = PriceTable.load().get(MODEL)
    assert price is not None
    for position, row in enumerate(output.iter_rows(named=True)):
        list_cost = price.cost(row["prompt_tokens"], row["completion_tokens"])
        share = 1.0 if position < 20 else 0.5
        assert row["cost_usd"] == pytest.approx(list_cost * share)


def test_a_second_batch_run_of_a_job_is_refused(
    tmp_path: Path, sim_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory(batch_delay_s=30)
    job = write_job(
        tmp_path, server.url, data=reviews(30), endpoint={"mode": "batch"}, batch={"poll_s": 0.2}
    )
    first = start(job)
    try:
        service = server.simulator.batches
        wait_for(lambda: service.batches or first.poll() is not None)
        assert first.poll() is None, "the first run ended before the test could start another"
        capsys.readouterr()
        assert main(["run", str(job), "--quiet"]) == 2
        error = capsys.readouterr().err
        assert "another run of this job is using this checkpoint" in error
        assert len(service.batches) == 1  # the second run submitted nothing
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 3


@pytest.mark.parametrize("mode", ["live", "batch"])
def test_an_unwritable_output_is_found_before_anything_is_sent(
    tmp_path: Path, sim_factory: Any, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    server = sim_factory()
    (tmp_path / "blocker").write_text("a file where the output's folder should be")
    job = write_job(
        tmp_path,
        server.url,
        data=reviews(10),
        endpoint={"mode": mode},
        output={"path": "blocker/result.parquet", "checkpoint_dir": "ck"},
    )
    assert main(["run", str(job), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ")
    assert "output.path" in error
    assert server.simulator.requests == 0
    assert not server.simulator.batches.batches


def test_an_interrupted_batch_run_writes_what_it_collected_and_exits_3(
    tmp_path: Path, sim_factory: Any
) -> None:
    server = sim_factory(batch_delay_s=30)
    job = write_job(
        tmp_path,
        server.url,
        data=reviews(30),
        endpoint={"mode": "batch"},
        batch={"poll_s": 0.2, "max_lines": 10},
    )
    process = start(job)
    service = server.simulator.batches
    wait_for(lambda: len(service.batches) == 3 or process.poll() is not None)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 3
    text = stderr.decode()
    assert "3 batch(es) keep running on the server" in text
    assert "Traceback" not in text
    # The output was written (no row answered yet) and the lock was let go: a rerun may start.
    assert pl.read_parquet(tmp_path / "out/result.parquet").height == 0
