"""Throughput benchmark: batcher end to end against bare client loops, in one run.

    python bench/throughput.py                      # cases A and B, 3 runs each, medians
    python bench/throughput.py --case C             # 100,000 and 1,000,000 rows: peak RSS
    python bench/throughput.py --case A --runs 5 --rows 20000
    python bench/throughput.py --baseline ../old/.venv/bin/python   # and an earlier version

The reply server is batcher's own simulator (fixed reply per request, usage included) in its
own process, pinned to the last core; every client runs in its own process pinned to core 0,
so CPU time and peak RSS are the client's alone (from wait4's rusage).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CORES = os.cpu_count() or 1
SERVER_CORE = CORES - 1
CLIENT_CORE = 0
MODEL = "claude-3-5-haiku-20241022"
BASELINE: list[str] = []  # the interpreter of --baseline


def body(i: int) -> bytes:
    import orjson

    return orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Say hello to row {i}."}],
            "max_tokens": 16,
        }
    )


async def floor_aiohttp(url: str, rows: int, concurrency: int) -> None:
    import aiohttp
    import orjson

    queue = iter(range(rows))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for i in queue:
                async with session.post(
                    url + "/chat/completions",
                    data=body(i),
                    headers={"Content-Type": "application/json"},
                ) as response:
                    orjson.loads(await response.read())

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def floor_httpx(url: str, rows: int, concurrency: int) -> None:
    import httpx
    import orjson
    from httpx_aiohttp import AiohttpTransport

    queue = iter(range(rows))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        transport=AiohttpTransport(limits=limits), base_url=url + "/"
    ) as client:

        async def worker() -> None:
            for i in queue:
                response = await client.post(
                    "chat/completions",
                    content=body(i),
                    headers={"Content-Type": "application/json"},
                )
                orjson.loads(response.content)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def pinned(core: int, argv: list[str]) -> subprocess.Popen[bytes]:
    def pin() -> None:
        if hasattr(os, "sched_setaffinity") and CORES > 1:
            os.sched_setaffinity(0, {core})

    return subprocess.Popen(argv, preexec_fn=pin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # noqa: PLW1509


def measure(argv: list[str], rows: int) -> dict[str, float]:
    """Wall time, client CPU and peak RSS of one client process."""
    started = time.monotonic()
    process = pinned(CLIENT_CORE, argv)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    err = process.stderr.read().decode() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[:4]} failed:\n{err}")
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "rps": rows / wall,
        "cpu_ms": cpu / rows * 1000,
        "rss_mb": usage.ru_maxrss / 1024,
        "wall_s": wall,
    }


def start_server(latency_s: float) -> tuple[subprocess.Popen[bytes], str]:
    port = 18_000 + os.getpid() % 1000
    process = pinned(
        SERVER_CORE,
        [
            sys.executable,
            "-m",
            "batcher.cli",
            "sim",
            "--port",
            str(port),
            "--latency-s",
            str(latency_s),
        ],
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if "listening" not in line:
        raise SystemExit(f"simulator did not start: {line}")
    return process, f"http://127.0.0.1:{port}/v1"


def batcher_job(folder: Path, url: str, rows: int, concurrency: int) -> Path:
    data = folder / f"rows-{rows}.parquet"
    if not data.exists():
        # Written by a child process: Linux carries a parent's peak RSS into the children it
        # forks, so this process stays small for wait4 to report each client's own peak.
        script = (
            "import polars as pl, sys; n = int(sys.argv[1]); "
            "pl.DataFrame({'text': [f'Say hello to row {i}.' for i in range(n)]})"
            ".write_parquet(sys.argv[2])"
        )
        subprocess.run([sys.executable, "-c", script, str(rows), str(data)], check=True)
    job = {
        "name": "throughput",
        "input": {"path": data.name},
        "endpoint": {"base_url": url},
        "request": {"model": MODEL, "prompt": "{{ text }}", "max_tokens": 16},
        "limits": {"concurrency": concurrency},
        "output": {"path": f"out-{rows}.parquet"},
    }
    path = folder / f"job-{rows}-{concurrency}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def client_argv(kind: str, url: str, rows: int, concurrency: int, job: Path) -> list[str]:
    # -P: "-m" would otherwise put the working directory first on the path, and a baseline
    # started from this checkout would import this checkout's batcher, not its own.
    if kind == "batcher":
        return [sys.executable, "-P", "-m", "batcher.cli", "run", str(job), "--quiet", "--fresh"]
    if kind == "baseline":  # another install of batcher (an earlier version), same job
        return [BASELINE[0], "-P", "-m", "batcher.cli", "run", str(job), "--quiet", "--fresh"]
    return [
        sys.executable,
        str(HERE / "throughput.py"),
        "--client",
        kind,
        url,
        str(rows),
        str(concurrency),
    ]


def run_case(
    name: str, latency_s: float, rows: int, concurrency: int, runs: int, kinds: list[str]
) -> None:
    server, url = start_server(latency_s)
    try:
        with tempfile.TemporaryDirectory() as folder:
            job = batcher_job(Path(folder), url, rows, concurrency)
            results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
            for _ in range(runs):  # interleaved, so drift hits every client alike
                for kind in kinds:
                    results[kind].append(
                        measure(client_argv(kind, url, rows, concurrency, job), rows)
                    )
    finally:
        server.terminate()
        server.wait()
    medians = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in results.items()}
    print(
        f"\ncase {name}: latency {latency_s * 1000:.0f} ms, concurrency {concurrency}, "
        f"{rows:,} rows, medians of {runs}, {CORES} cores"
    )
    print(f"{'client':14} {'req/s':>8} {'CPU ms/req':>10} {'peak RSS MB':>11}")
    for kind, m in medians.items():
        print(f"{kind:14} {m['rps']:>8.0f} {m['cpu_ms']:>10.3f} {m['rss_mb']:>11.0f}")
    if "batcher" in medians:
        for floor in ("floor-httpx", "floor-aiohttp", "baseline"):
            if floor in medians:
                print(f"batcher / {floor}: {medians['batcher']['rps'] / medians[floor]['rps']:.0%}")
    if latency_s:
        ceiling = concurrency / latency_s
        for kind, m in medians.items():
            print(
                f"{kind} share of Little's-law ceiling {ceiling:,.0f}/s: {m['rps'] / ceiling:.0%}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=["A", "B", "C"], action="append")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument(
        "--baseline",
        metavar="PYTHON",
        help="also run the batcher installed for this interpreter (say, an earlier commit's)",
    )
    parser.add_argument(
        "--client", nargs=4, metavar=("KIND", "URL", "ROWS", "CONCURRENCY"), help=argparse.SUPPRESS
    )
    arguments = parser.parse_args()
    if arguments.client:
        kind, url, rows, concurrency = arguments.client
        loop = floor_aiohttp if kind == "floor-aiohttp" else floor_httpx
        asyncio.run(loop(url, int(rows), int(concurrency)))
        return
    kinds = ["floor-aiohttp", "floor-httpx", "batcher"]
    if arguments.baseline:
        BASELINE.append(arguments.baseline)
        kinds.append("baseline")
    for case in arguments.case or ["A", "B"]:
        if case == "A":
            run_case("A", 0.0, arguments.rows, 256, arguments.runs, kinds)
        elif case == "B":
            run_case("B", 0.2, arguments.rows, 512, arguments.runs, kinds)
        else:
            for rows in (100_000, 1_000_000):
                run_case(f"C ({rows:,} rows)", 0.0, rows, 256, 1, ["batcher"])


if __name__ == "__main__":
    main()
