"""Image benchmark: 2,000 rows of 3000x2000 JPEGs through resizing, against the simulator.

    python bench/images.py [--rows 2000] [--files 50] [--concurrency 32]

Rows cycle through --files distinct files (generated once), so the disk stays small while every
row is still read, hashed, decoded, resized and encoded. Prints rows/s and peak RSS (wait4).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import yaml
from PIL import Image, ImageDraw

from batcher.sim import SimulatorThread


def photo(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    image = Image.linear_gradient("L").resize((3000, 2000)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y, r = rng.randrange(3000), rng.randrange(2000), rng.randrange(20, 300)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    image.save(path, quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--files", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=32)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as name, SimulatorThread() as sim:
        folder = Path(name)
        (folder / "photos").mkdir()
        for i in range(arguments.files):
            photo(folder / "photos" / f"{i}.jpg", i)
        # Distinct prompts per row, so every row is its own request.
        pl.DataFrame(
            {
                "n": list(range(arguments.rows)),
                "photo": [f"{i % arguments.files}.jpg" for i in range(arguments.rows)],
            }
        ).write_parquet(folder / "rows.parquet")
        job = {
            "name": "images",
            "input": {"path": "rows.parquet", "image_root": "photos"},
            "endpoint": {"base_url": sim.url},
            "request": {
                "model": "claude-sonnet-4-20250514",
                "prompt": "Caption photo {{ n }}.",
                "images": ["photo"],
                "max_tokens": 50,
            },
            "limits": {"concurrency": arguments.concurrency},
            "output": {"path": "out.parquet"},
        }
        (folder / "job.yaml").write_text(yaml.safe_dump(job))
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "batcher.cli", "run", str(folder / "job.yaml"), "--quiet"]
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
        assert sim.simulator is not None
        sizes = {(i["width"], i["height"]) for i in sim.simulator.images}
        print(
            f"rows {arguments.rows:,} of 3000x2000 JPEG, concurrency {arguments.concurrency}, "
            f"exit {os.waitstatus_to_exitcode(status)}"
        )
        print(
            f"wall {wall:.1f} s, {arguments.rows / wall:.1f} rows/s, "
            f"peak RSS {usage.ru_maxrss / 1024:.0f} MB"
        )
        print(f"sizes that arrived: {sorted(sizes)}")


if __name__ == "__main__":
    main()
