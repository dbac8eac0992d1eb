"""The `batcher` command: thin argument parsing over the runner, simulator and reports."""

from __future__ import annotations

import argparse
import gc
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn, TextIO

import anyio
import orjson

from batcher.config import load_job
from batcher.errors import BatcherError, ConfigError, exit_code, printable
from batcher.reports.agreement import majority, measure, read_votes
from batcher.reports.estimate import estimate
from batcher.reports.ledger import read_ledger
from batcher.reports.preview import DEFAULT_ROWS, preview
from batcher.reports.sample import estimate_with_sample
from batcher.reports.status import job_status
from batcher.runs.shell import RunOptions, arun
from batcher.sim import FAULT_KINDS, SimSettings, serve
from batcher.sim.limits import LIMITER_KINDS

_MAX_ROWS = 2**32 - 1  # polars slices by a 32-bit row index


class _Parser(argparse.ArgumentParser):
    """argparse with the house's one-line ``error: <what>`` instead of usage plus message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _count(text: str) -> int:
    """A row count: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value <= _MAX_ROWS:
        raise argparse.ArgumentTypeError(f"must be 0 to {_MAX_ROWS}, got {value}")
    return value


def _attempt_range(text: str) -> tuple[int, int]:
    """``N`` or ``MIN-MAX`` first attempts to fail, each at least 1."""
    low, _, high = text.partition("-")
    try:
        bounds = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return bounds


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
    parser.add_argument("--limit", type=_count, metavar="N", help="only the first N rows")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    run.add_argument(
        "--keep-done",
        action="store_true",
        help="keep rows answered before, whatever their request is now; send the rest",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--progress-every",
        type=_seconds,
        default=30.0,
        metavar="S",
        help="without a terminal, a status line every S seconds (0: none; default 30)",
    )
    run.add_argument("--prices", metavar="FILE", help="a price table instead of the shipped one")
    run.add_argument("--ray", action="store_true", help="run across a Ray cluster (batcher[ray])")
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
    cost.add_argument(
        "--by",
        metavar="COLUMN",
        help="group by this column (default: request_model if the output has it, else model)",
    )
    cost.add_argument("--json", action="store_true", help="print JSON for machines")

    agree = commands.add_parser(
        "agree", help="how often models (or a row's choices) give the same label"
    )
    agree.add_argument("output", help="a batcher output Parquet file")
    agree.add_argument("--column", required=True, help="the label column, e.g. response")
    agree.add_argument(
        "--by", metavar="COLUMN", help="the raters, e.g. request_model (default: the n choices)"
    )
    agree.add_argument("--json", action="store_true", help="print JSON for machines")
    agree.add_argument(
        "--out", metavar="FILE", help="write each row's majority label and vote share (Parquet)"
    )

    estimate = commands.add_parser("estimate", help="what a job will cost, before running it")
    _job_arguments(estimate)
    estimate.add_argument("--sample", type=_count, metavar="K", help="run K random rows for real")
    estimate.add_argument("--simulate", action="store_true", help="sample against the simulator")
    estimate.add_argument(
        "--prices", metavar="FILE", help="a price table instead of the shipped one"
    )
    estimate.add_argument("--json", action="store_true", help="print JSON for machines")

    preview = commands.add_parser(
        "preview", help="print the exact request bodies of the first rows, sending nothing"
    )
    preview.add_argument("job", help="the job file (YAML)")
    preview.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job-file key (value parsed as YAML)",
    )
    preview.add_argument(
        "--limit", type=int, default=DEFAULT_ROWS, metavar="N", help="rows to show (default 3)"
    )
    preview.add_argument("--json", action="store_true", help="print JSON for machines")

    _sim_arguments(commands.add_parser("sim", help="serve the simulator on 127.0.0.1"))
    return parser


def _sim_arguments(sim: argparse.ArgumentParser) -> None:
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
        "--fail-attempts",
        type=_attempt_range,
        default=(1, 3),
        help="how many first attempts they fail: N or MIN-MAX",
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
    sim.add_argument(
        "--schema-violation-share",
        type=float,
        default=0.0,
        help="share of structured replies (tools, response_format) that break their schema",
    )
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--limiter",
        choices=LIMITER_KINDS,
        default="bucket",
        help="how limits are enforced: token bucket, fixed window or sliding window",
    )
    sim.add_argument("--window-s", type=float, default=60.0, help="the windows' length")
    sim.add_argument(
        "--limit-retry-after-s",
        type=float,
        help="Retry-After of limit 429s (default: the exact wait until there is room)",
    )
    sim.add_argument(
        "--no-limit-retry-after", action="store_true", help="limit 429s carry no Retry-After"
    )
    sim.add_argument(
        "--ratelimit-headers",
        choices=("openai", "anthropic"),
        help="advertise the limits in every reply's headers, in this style",
    )
    sim.add_argument(
        "--random-429-share",
        type=float,
        default=0.0,
        help="answer this share of requests 429 whatever the rate (Retry-After --retry-after-s)",
    )
    sim.add_argument(
        "--schedule",
        type=_schedule,
        default=(),
        metavar="S:RPM,...",
        help="change --requests-per-minute to RPM at S seconds after the first request",
    )
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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds (0 or more), got {text!r}")
    return value


def _schedule(text: str) -> tuple[tuple[float, float], ...]:
    try:
        steps = [tuple(float(n) for n in step.split(":")) for step in text.split(",") if step]
    except ValueError:
        steps = [()]
    if any(len(step) != 2 or step[0] < 0 or step[1] <= 0 for step in steps):
        raise argparse.ArgumentTypeError(f"expected SECONDS:RPM,... got {text!r}")
    return tuple((step[0], step[1]) for step in steps)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        arguments = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad argument already reported on one line
        return exc.code if isinstance(exc.code, int) else 2
    with _sigterm_as_interrupt():
        try:
            return _main(arguments, argv)
        except KeyboardInterrupt as exc:
            # Outside a run's own handling (pre-flight, or a late second Ctrl-C): one line.
            print("error: interrupted; run the same command again to resume", file=sys.stderr)
            return exit_code(exc)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt like Ctrl-C, rather than killing with status 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signal: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(arguments: argparse.Namespace, argv: Sequence[str] | None) -> int:
    try:
        if arguments.command == "run":
            return _run(arguments, argv)
        if arguments.command == "cancel":
            return _cancel(arguments)
        if arguments.command == "status":
            job = load_job(arguments.job, arguments.overrides)
            _say(job_status(job, arguments.limit).lines())
            return 0
        if arguments.command == "sim":
            return _sim(arguments)
        if arguments.command == "cost":
            ledger = read_ledger(arguments.output, arguments.by)
            if arguments.json:
                print(orjson.dumps(ledger.as_json()).decode())
            else:
                _say(ledger.lines())
            return 0
        if arguments.command == "estimate":
            return _estimate(arguments)
        if arguments.command == "agree":
            return _agree(arguments)
        if arguments.command == "preview":
            job = load_job(arguments.job, arguments.overrides)
            shown = preview(job, rows=arguments.limit)
            if arguments.json:
                print(orjson.dumps([row.as_json() for row in shown]).decode())
            else:
                _say([line for row in shown for line in row.lines()], blocks=True)
            return 0
    except BatcherError as exc:
        _say([f"error: {exc}"], sys.stderr)
        return exit_code(exc)
    raise AssertionError(arguments.command)  # pragma: no cover


def _run(arguments: argparse.Namespace, argv: Sequence[str] | None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    resume = shlex.join(["batcher", *(w for w in words if w != "--fresh")])
    options = RunOptions(
        simulate=arguments.simulate,
        limit=arguments.limit,
        fresh=arguments.fresh,
        skip_failed=arguments.skip_failed,
        keep_done=arguments.keep_done,
        quiet=arguments.quiet,
        prices_path=arguments.prices,
        resume_command=resume,
        progress_every_s=arguments.progress_every,
        cancel=arguments.cancel,
    )
    job = load_job(arguments.job, arguments.overrides)
    if arguments.cancel and job.config.endpoint.mode != "batch":
        raise ConfigError(f"{job.source}: endpoint.mode: --cancel is for endpoint.mode: batch")
    if arguments.ray:
        try:
            from batcher.runs.ray.driver import run_on_ray  # Ray is imported with --ray only
        except ImportError as exc:
            raise ConfigError(f"--ray needs Ray ({exc}): pip install 'batcher[ray]'") from None
        summary = run_on_ray(job, options)
    else:
        # What the imports and the job's loading built lives as long as the process: frozen,
        # it is out of the collector's sight, and the full collections a long run makes stop
        # scanning it again (about 4 % of the client's CPU a request at 0 ms latency, measured).
        gc.freeze()
        summary = anyio.run(lambda: arun(job, options))
    _say(summary.lines(), sys.stderr)
    return summary.exit_code


def _say(lines: Sequence[str], file: TextIO | None = None, *, blocks: bool = False) -> None:
    """Print ``lines`` (to stdout by default), each made safe for a terminal: they quote
    servers' words (messages, model names, answers) and the input's, whose escape sequences
    and carriage returns are not ours to send. ``blocks``: lines of ours that hold newlines
    (indented JSON), kept."""
    for line in lines:
        for part in line.split("\n") if blocks else [line]:
            print(printable(part), file=file or sys.stdout)


def _agree(arguments: argparse.Namespace) -> int:
    votes = read_votes(arguments.output, arguments.column, arguments.by)
    result = measure(votes)
    if arguments.out:
        try:
            majority(votes).write_parquet(arguments.out)
        except OSError as exc:
            raise ConfigError(f"{arguments.out}: --out: cannot write: {exc.strerror}") from None
    if arguments.json:
        print(orjson.dumps(result.as_json()).decode())
    else:
        _say(result.lines())
    return 0


def _cancel(arguments: argparse.Namespace) -> int:
    job = load_job(arguments.job, arguments.overrides)
    if job.config.endpoint.mode != "batch":
        raise ConfigError(f"{job.source}: endpoint.mode: cancel is for endpoint.mode: batch")
    options = RunOptions(limit=arguments.limit, quiet=arguments.quiet, cancel=True)
    summary = anyio.run(lambda: arun(job, options))
    _say(summary.lines(), sys.stderr)
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
        _say(result.lines())
    return 0


def _sim(arguments: argparse.Namespace) -> int:
    low, high = arguments.fail_attempts
    settings = SimSettings(
        latency_s=arguments.latency_s,
        latency_jitter_s=arguments.latency_jitter_s,
        requests_per_minute=arguments.requests_per_minute,
        tokens_per_minute=arguments.tokens_per_minute,
        burst_s=arguments.burst_s,
        fail_share=arguments.fail_share,
        fail_attempts_min=low,
        fail_attempts_max=high,
        faults=tuple(f for f in arguments.faults.split(",") if f),
        stall_s=arguments.stall_s,
        retry_after_s=arguments.retry_after_s,
        cached_share=arguments.cached_share,
        schema_violation_share=arguments.schema_violation_share,
        seed=arguments.seed,
        limiter=arguments.limiter,
        window_s=arguments.window_s,
        limit_retry_after_s=arguments.limit_retry_after_s,
        send_retry_after=not arguments.no_limit_retry_after,
        ratelimit_headers=arguments.ratelimit_headers,
        random_429_share=arguments.random_429_share,
        schedule=arguments.schedule,
        batch_api=not arguments.no_batch_api,
        batch_delay_s=arguments.batch_delay_s,
        batch_fail_share=arguments.batch_fail_share,
        batch_expire=tuple(int(n) for n in arguments.batch_expire.split(",") if n),
        batch_max_file_bytes=arguments.batch_max_file_bytes,
        batch_max_lines=arguments.batch_max_lines,
    )
    unknown = set(settings.faults) - set(FAULT_KINDS)
    if unknown:
        raise ConfigError(f"--faults: unknown kind(s) {', '.join(sorted(unknown))}")

    async def serve_forever() -> None:
        async with serve(settings, port=arguments.port) as (url, _):
            print(f"simulator listening on {url}", flush=True)
            await anyio.sleep_forever()

    try:
        anyio.run(serve_forever)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:  # the port is taken, or not ours to bind
        raise ConfigError(
            f"sim: cannot listen on 127.0.0.1:{arguments.port}: {exc.strerror or exc}"
        ) from None
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
