"""The `batcher` command: thin argument parsing over the runner, simulator and reports."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

import anyio
import orjson

from batcher.config import load_job
from batcher.errors import BatcherError, ConfigError
from batcher.estimate import estimate, estimate_with_sample
from batcher.ledger import read_ledger
from batcher.runner import RunOptions, arun
from batcher.sim import FAULT_KINDS, SimSettings, serve
from batcher.status import job_status


def _job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="the job file (YAML)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job-file key, e.g. --set limits.concurrency=64 (value parsed as YAML)",
    )
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N rows")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batcher",
        description="Run large batches of LLM chat-completion requests reliably and cheaply.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a job")
    _job_arguments(run)
    run.add_argument("--simulate", action="store_true", help="run against the built-in simulator")
    run.add_argument("--fresh", action="store_true", help="replace the job's checkpoint")
    run.add_argument(
        "--skip-failed", action="store_true", help="do not retry rows that failed before"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--prices", metavar="FILE", help="a price table instead of the shipped one")
    run.add_argument(
        "--cancel",
        action="store_true",
        help="batch mode: cancel the job's batches in flight and collect what they finished",
    )

    cancel = commands.add_parser(
        "cancel", help="batch mode: cancel a job's batches in flight, keep what they finished"
    )
    _job_arguments(cancel)
    cancel.add_argument("--quiet", action="store_true", help="no progress bar")

    status = commands.add_parser("status", help="how far a job is, from its checkpoint")
    _job_arguments(status)

    cost = commands.add_parser("cost", help="rows, tokens and dollars of an output file")
    cost.add_argument("output", help="a batcher output Parquet file (or a glob)")
    cost.add_argument("--by", default="model", metavar="COLUMN", help="group by this column")
    cost.add_argument("--json", action="store_true", help="print JSON for machines")

    estimate = commands.add_parser("estimate", help="what a job will cost, before running it")
    _job_arguments(estimate)
    estimate.add_argument("--sample", type=int, metavar="K", help="run K random rows for real")
    estimate.add_argument("--simulate", action="store_true", help="sample against the simulator")
    estimate.add_argument(
        "--prices", metavar="FILE", help="a price table instead of the shipped one"
    )
    estimate.add_argument("--json", action="store_true", help="print JSON for machines")

    sim = commands.add_parser("sim", help="serve the simulator on 127.0.0.1")
    sim.add_argument("--port", type=int, default=8000)
    sim.add_argument("--latency-s", type=float, default=0.0, help="fixed latency per request")
    sim.add_argument(
        "--latency-jitter-s", type=float, default=0.0, help="plus uniform random up to this"
    )
    sim.add_argument("--requests-per-minute", type=float, help="enforce with 429 + Retry-After")
    sim.add_argument("--tokens-per-minute", type=float, help="enforce with 429 + Retry-After")
    sim.add_argument("--burst-s", type=float, default=1.0, help="seconds of rate the buckets hold")
    sim.add_argument(
        "--fail-share", type=float, default=0.0, help="share of rows that fail at first"
    )
    sim.add_argument(
        "--fail-attempts", default="1-3", help="how many first attempts they fail: N or MIN-MAX"
    )
    sim.add_argument(
        "--faults",
        default="429,500,503,drop,stall,malformed",
        help=f"comma-separated fault kinds, of: {', '.join(FAULT_KINDS)}",
    )
    sim.add_argument("--stall-s", type=float, default=600.0, help="how long a stall hangs")
    sim.add_argument(
        "--retry-after-s", type=float, default=0.1, help="Retry-After of injected 429/503"
    )
    sim.add_argument(
        "--cached-share", type=float, default=0.0, help="share of prompt tokens reported cached"
    )
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--no-batch-api", action="store_true", help="answer 404 on the Batch API")
    sim.add_argument(
        "--batch-delay-s", type=float, default=0.0, help="how long a batch takes to finish"
    )
    sim.add_argument(
        "--batch-fail-share",
        type=float,
        default=0.0,
        help="share of batch lines whose first submission fails with 500",
    )
    sim.add_argument(
        "--batch-expire",
        default="",
        metavar="N,M",
        help="batches (1-based, in order of creation) that expire half done",
    )
    sim.add_argument("--batch-max-file-bytes", type=int, help="refuse larger uploads with 413")
    sim.add_argument("--batch-max-lines", type=int, help="refuse larger batches with 400")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "run":
            return _run(arguments, argv)
        if arguments.command == "cancel":
            return _cancel(arguments)
        if arguments.command == "status":
            job = load_job(arguments.job, arguments.overrides)
            for line in job_status(job, arguments.limit).lines():
                print(line)
            return 0
        if arguments.command == "sim":
            return _sim(arguments)
        if arguments.command == "cost":
            ledger = read_ledger(arguments.output, arguments.by)
            if arguments.json:
                print(orjson.dumps(ledger.as_json()).decode())
            else:
                print("\n".join(ledger.lines()))
            return 0
        if arguments.command == "estimate":
            return _estimate(arguments)
    except BatcherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    raise AssertionError(arguments.command)  # pragma: no cover


def _run(arguments: argparse.Namespace, argv: Sequence[str] | None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    resume = shlex.join(["batcher", *(w for w in words if w != "--fresh")])
    options = RunOptions(
        simulate=arguments.simulate,
        limit=arguments.limit,
        fresh=arguments.fresh,
        skip_failed=arguments.skip_failed,
        quiet=arguments.quiet,
        prices_path=arguments.prices,
        resume_command=resume,
        cancel=arguments.cancel,
    )
    job = load_job(arguments.job, arguments.overrides)
    if arguments.cancel and job.config.endpoint.mode != "batch":
        raise ConfigError(f"{job.source}: endpoint.mode: --cancel is for endpoint.mode: batch")
    summary = anyio.run(lambda: arun(job, options))
    for line in summary.lines():
        print(line, file=sys.stderr)
    return summary.exit_code


def _cancel(arguments: argparse.Namespace) -> int:
    job = load_job(arguments.job, arguments.overrides)
    if job.config.endpoint.mode != "batch":
        raise ConfigError(f"{job.source}: endpoint.mode: cancel is for endpoint.mode: batch")
    options = RunOptions(limit=arguments.limit, quiet=arguments.quiet, cancel=True)
    summary = anyio.run(lambda: arun(job, options))
    for line in summary.lines():
        print(line, file=sys.stderr)
    return 0


def _estimate(arguments: argparse.Namespace) -> int:
    job = load_job(arguments.job, arguments.overrides)
    if arguments.sample:
        options = RunOptions(simulate=arguments.simulate, quiet=True, prices_path=arguments.prices)
        result = anyio.run(
            lambda: estimate_with_sample(
                job, arguments.sample, limit=arguments.limit, options=options
            )
        )
    else:
        result = estimate(job, limit=arguments.limit, prices_path=arguments.prices)
    if arguments.json:
        print(orjson.dumps(result.as_json()).decode())
    else:
        print("\n".join(result.lines()))
    return 0


def _sim(arguments: argparse.Namespace) -> int:
    low, _, high = arguments.fail_attempts.partition("-")
    settings = SimSettings(
        latency_s=arguments.latency_s,
        latency_jitter_s=arguments.latency_jitter_s,
        requests_per_minute=arguments.requests_per_minute,
        tokens_per_minute=arguments.tokens_per_minute,
        burst_s=arguments.burst_s,
        fail_share=arguments.fail_share,
        fail_attempts_min=int(low),
        fail_attempts_max=int(high or low),
        faults=tuple(f for f in arguments.faults.split(",") if f),
        stall_s=arguments.stall_s,
        retry_after_s=arguments.retry_after_s,
        cached_share=arguments.cached_share,
        seed=arguments.seed,
        batch_api=not arguments.no_batch_api,
        batch_delay_s=arguments.batch_delay_s,
        batch_fail_share=arguments.batch_fail_share,
        batch_expire=tuple(int(n) for n in arguments.batch_expire.split(",") if n),
        batch_max_file_bytes=arguments.batch_max_file_bytes,
        batch_max_lines=arguments.batch_max_lines,
    )
    unknown = set(settings.faults) - set(FAULT_KINDS)
    if unknown:
        print(f"error: --faults: unknown kind(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2

    async def serve_forever() -> None:
        async with serve(settings, port=arguments.port) as (url, _):
            print(f"simulator listening on {url}", flush=True)
            await anyio.sleep_forever()

    try:
        anyio.run(serve_forever)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
