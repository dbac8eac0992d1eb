"""Shared fixtures: the simulator on a loopback port, and job files written per test."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from batcher.sim import SimSettings, SimulatorThread

MODEL = "claude-3-5-haiku-20241022"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray for the session's `ray` tests (imported here only when one asks)."""
    import ray

    ray.init(
        address="local",
        num_cpus=4,
        object_store_memory=100 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="warning",
    )
    yield
    ray.shutdown()


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
def sim_factory() -> Iterator[Callable[..., SimulatorThread]]:
    started: list[SimulatorThread] = []

    def start(**settings: Any) -> SimulatorThread:
        server = SimulatorThread(SimSettings(**settings)).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__()


@pytest.fixture
def sim(sim_factory: Callable[..., SimulatorThread]) -> SimulatorThread:
    return sim_factory()


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
