"""Ray scale-out benchmark: one global budget across workers, and image jobs on 1, 2, 4 workers.

    python -m bench.ray_scale [--rate-rows 800] [--image-rows 120] [--skip-rate] [--skip-images]
                              [--discover]

1. Rate: 4 workers against a simulator enforcing 1,200 requests/min over sliding 10 s windows,
   the job at 1,200/min. Prints the combined rate as a share of the limit and the 429 share
   (each worker pacing itself at the job's rate would send 4 × 1,200/min). ``--discover``
   adds the same with no rate in the job: the budget actor discovers it from every 429.
2. Images: 3000x2000 JPEGs decoded, resized and encoded per row (as ``bench/images.py``), on
   1, 2 and 4 workers of one local Ray cluster (4 CPUs declared). Prints rows/s and the
   speed-up against linear. On a machine with fewer cores than workers, the cores bound it.

Everything runs on one local Ray cluster started here and a simulator on loopback.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
import ray
import yaml

from batcher.config import load_job
from batcher.runs.ray.driver import run_on_ray
from batcher.runs.shell import RunOptions
from batcher.sim import SimSettings, SimulatorThread
from bench.images import photo

SERVER_RPM = 1200


def write(folder: Path, job: dict[str, Any]) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def rate_case(rows: int, *, job_rpm: float | None = SERVER_RPM) -> None:
    settings = SimSettings(
        requests_per_minute=SERVER_RPM, limiter="sliding", window_s=10, latency_s=0.2
    )
    with tempfile.TemporaryDirectory() as name, SimulatorThread(settings) as sim:
        folder = Path(name)
        pl.DataFrame({"n": list(range(rows))}).write_parquet(folder / "rows.parquet")
        job = write(
            folder,
            {
                "name": "rate",
                "input": {"path": "rows.parquet"},
                "endpoint": {"base_url": sim.url},
                "request": {"model": "claude-3-5-haiku-20241022", "prompt": "Row {{ n }}."},
                "limits": {"requests_per_minute": job_rpm} if job_rpm else {},
                "output": {"path": "out.parquet"},
                "ray": {"workers": 4, "shard_rows": max(rows // 8, 1)},
            },
        )
        summary = run_on_ray(load_job(job), RunOptions(quiet=True))
        assert sim.simulator is not None
        times = sorted(sim.simulator.answered_at)
        rate = (len(times) - 1) / (times[-1] - times[0]) * 60
        limited = sim.simulator.statuses["429"]
        requests = sim.simulator.requests
        stated = f"job at {job_rpm:,.0f}/min" if job_rpm else "no rate stated (discovered)"
        print(
            f"rate: 4 workers, {rows} rows, {stated}, "
            f"server {SERVER_RPM:,}/min over sliding 10 s windows: "
            f"{rate:,.0f}/min = {rate / SERVER_RPM:.0%} of the limit, "
            f"429s {limited} of {requests} ({limited / requests:.1%}), "
            f"{summary.rows_ok} ok, wall {summary.wall_s:.1f} s"
        )


def image_case(rows: int, files: int, workers: int, photos: Path) -> float:
    with tempfile.TemporaryDirectory() as name, SimulatorThread() as sim:
        folder = Path(name)
        pl.DataFrame(
            {"n": list(range(rows)), "photo": [f"{i % files}.jpg" for i in range(rows)]}
        ).write_parquet(folder / "rows.parquet", row_group_size=max(rows // 16, 1))
        job = write(
            folder,
            {
                "name": "images",
                "input": {"path": "rows.parquet", "image_root": str(photos)},
                "endpoint": {"base_url": sim.url},
                "request": {
                    "model": "claude-sonnet-4-20250514",
                    "prompt": "Caption photo {{ n }}.",
                    "images": ["photo"],
                    "max_tokens": 50,
                },
                "limits": {"concurrency": 8},
                "output": {"path": "out.parquet"},
                "ray": {"workers": workers, "shard_rows": max(rows // 16, 1)},
            },
        )
        started = time.monotonic()
        summary = run_on_ray(load_job(job), RunOptions(quiet=True))
        wall = time.monotonic() - started
        assert summary.rows_ok == rows, summary.lines()
        return rows / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate-rows", type=int, default=800)
    parser.add_argument("--image-rows", type=int, default=120)
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--skip-rate", action="store_true")
    parser.add_argument(
        "--discover", action="store_true", help="also the rate case with no rate in the job"
    )
    parser.add_argument("--skip-images", action="store_true")
    arguments = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    print(f"machine: {os.cpu_count()} cores; Ray {ray.__version__}, 4 CPUs declared")
    try:
        if not arguments.skip_rate:
            rate_case(arguments.rate_rows)
        if arguments.discover:
            rate_case(arguments.rate_rows, job_rpm=None)
        if arguments.skip_images:
            return
        with tempfile.TemporaryDirectory() as name:
            photos = Path(name)
            for i in range(arguments.files):
                photo(photos / f"{i}.jpg", i)
            base: float | None = None
            for workers in (1, 2, 4):
                rate = image_case(arguments.image_rows, arguments.files, workers, photos)
                base = base or rate
                print(
                    f"images: {workers} worker(s), {arguments.image_rows} rows of 3000x2000 "
                    f"JPEG: {rate:.1f} rows/s, {rate / base:.2f}x of 1 worker "
                    f"({rate / (base * workers):.0%} of linear)"
                )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
