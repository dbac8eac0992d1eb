"""Shared fixtures: the simulator on a loopback port, and job files written per test.

Every test runs with a distinctive API key in ``BATCHER_API_KEY`` (sent even to loopback
servers); whatever a test wrote under its ``tmp_path``, and Ray's session folder after the
``--ray`` tests, must hold it in no form (``tests/leaks.py``).
"""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import polars as pl
import pytest
import yaml

from batcher.cli import main
from batcher.sim import SimSettings, SimulatorThread
from tests.leaks import leaks

MODEL = "claude-3-5-haiku-20241022"
SimFactory = Callable[..., SimulatorThread]  # sim_factory(**SimSettings fields)
# "+", "/" and "=" make its percent-encoded form differ from it.
TEST_KEY = "sk-batcher+test/KEY=7f3c9a1e5b2d8046"
TEST_AWS_SECRET = "aws+test/SECRET=9d41c07e2b8a5f36"  # for the tests on a local S3 server


@pytest.fixture(autouse=True)
def _no_key_written(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Each test runs with ``TEST_KEY``; none leaves it in a file under its ``tmp_path``."""
    monkeypatch.setenv("BATCHER_API_KEY", TEST_KEY)
    yield
    folder = request.node.funcargs.get("tmp_path")
    if folder is not None:
        found = leaks([folder], [TEST_KEY, TEST_AWS_SECRET])
        assert not found, f"a secret was written: {found}"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Path]:
    """One local Ray for the session's `ray` tests (imported here only when one asks);
    yields its session folder, which once the cluster is down holds no secret."""
    import ray

    context = ray.init(
        address="local",
        num_cpus=4,
        object_store_memory=100 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    session = Path(cast("Any", context).address_info["session_dir"])  # a RayContext
    yield session
    ray.shutdown()
    found = leaks([session], [TEST_KEY, TEST_AWS_SECRET])
    assert not found, f"a secret is in Ray's session folder: {found}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A local S3-compatible server (moto) on a loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sim_factory() -> Iterator[SimFactory]:
    started: list[SimulatorThread] = []

    def start(**settings: Any) -> SimulatorThread:
        server = SimulatorThread(SimSettings(**settings)).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__()


@pytest.fixture(scope="session")
def shared_simulator() -> Iterator[SimulatorThread]:
    with SimulatorThread() as server:
        yield server


@pytest.fixture
def sim(shared_simulator: SimulatorThread) -> SimulatorThread:
    """The session's simulator with default settings, reset: as good as a new one."""
    shared_simulator.simulator.reset()
    return shared_simulator


def reviews(count: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "id": [f"k{i:05d}" for i in range(count)],
            "title": [f"Title {i}" for i in range(count)],
            "text": [
                f"review number {i} says {'good' if i % 3 else 'bad'} things" for i in range(count)
            ],
            "stars": [i % 5 + 1 for i in range(count)],
        }
    )


def refused_where(data: pl.DataFrame, stars: int) -> pl.DataFrame:
    """``data`` with the rows of ``stars`` stars marked for the simulator to refuse (HTTP 400,
    not retried): their rows fail, the others are answered."""
    marked = pl.when(pl.col("stars") == stars).then("[[sim:400]] " + pl.col("text"))
    return data.with_columns(marked.otherwise(pl.col("text")).alias("text"))


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_job(
    folder: Path,
    base_url: str,
    *,
    data: pl.DataFrame | None = None,
    fmt: str = "csv",
    name: str = "job.yaml",
    **sections: Any,
) -> Path:
    """A job over ``data`` (default: 20 reviews) pointing at ``base_url``."""
    frame = reviews(20) if data is None else data
    data_path = folder / f"data.{fmt}"
    if not data_path.exists():
        if fmt == "csv":
            frame.write_csv(data_path)
        else:
            frame.write_parquet(data_path)
    job: dict[str, Any] = {
        "name": "test",
        "input": {"path": data_path.name, "id_column": "id"},
        "endpoint": {"base_url": base_url, "timeout_s": 10},
        "request": {"model": MODEL, "prompt": "Review {{ id }}: {{ text }}", "max_tokens": 32},
        "limits": {"concurrency": 16},
        "retry": {"initial_backoff_s": 0.01, "max_backoff_s": 0.2},
        "output": {"path": "out/result.parquet"},
    }
    job = merge(job, sections)
    path = folder / name
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def prompt_of(row_id: str, text: str) -> str:
    """The prompt the default job template renders for a row."""
    return f"Review {row_id}: {text}"


def start(job: Path, *, capture: bool = True) -> subprocess.Popen[bytes]:
    """`batcher run` in a real subprocess; read its output with communicate() when captured."""
    stream = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "batcher.cli", "run", str(job), "--quiet"],
        stdout=stream,
        stderr=stream,
    )


def wait_for(condition: Callable[[], object], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def busy_job(folder: Path, base_url: str, rows: int) -> Path:
    """A job slow enough to be sabotaged mid-run: ``rows`` reviews at concurrency 4, its
    checkpoint apart from the output (``ck``)."""
    return write_job(
        folder,
        base_url,
        data=reviews(rows),
        limits={"concurrency": 4},
        output={"checkpoint_dir": "ck"},
    )


def run_sabotaged(
    job: Path, server: SimulatorThread, sabotage: Callable[[], None], *, after: int
) -> int:
    """`batcher run JOB` here while another thread, once the server answered more than
    ``after`` rows, does ``sabotage``; the run's exit code."""

    def saboteur() -> None:
        simulator = server.simulator
        wait_for(lambda: simulator.answered > after)
        sabotage()

    thread = threading.Thread(target=saboteur)
    thread.start()
    try:
        return main(["run", str(job), "--quiet"])
    finally:
        thread.join()


def rerun(job: Path) -> int:
    """The same job again, fast: what a user does once the fault is fixed."""
    return main(["run", str(job), "--quiet", "--set", "limits.concurrency=64"])
