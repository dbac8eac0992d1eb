"""``batcher run JOB --ray``: the driver cuts the input into shards, hands them to workers on
a Ray cluster, retries a shard whose worker died, and writes the one output file.

Ray schedules; each shard runs batcher's own engine in a worker (``shard.py``), all of them
paced and held to the job's one dollar cap by one budget actor (``lease.py``,
``allowance.py``). The job's summary is the shards' summaries added up, with the first reason
any of them stopped. A rerun skips the shards an earlier run finished and resumes the others
from their journals.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from batcher.config import Job
from batcher.errors import AbortError, BatcherError, BudgetReachedError, ConfigError
from batcher.flow.controller import FlowReport
from batcher.rows.plan import Plan, plan_job
from batcher.runs.ray import storage
from batcher.runs.ray.actors import LimitsActor, ShardWorker
from batcher.runs.ray.assembly import merge_journals, part_locations, spent_before, write_parts
from batcher.runs.ray.reaper import Reaper
from batcher.runs.ray.secrets import WorkerSecrets
from batcher.runs.ray.shard import (
    PART,
    ShardResult,
    ShardTask,
    done_result,
    shard_config,
    task_identity,
    write_shard_input,
)
from batcher.runs.ray.shards import ShardedInput, cut
from batcher.runs.ray.signals import DriverSignals
from batcher.runs.shell import Run, RunOptions, checkpoint_identity
from batcher.runs.summary import RunSummary
from batcher.send.budget import budget_reached
from batcher.store.journal import Journal, journal_path, reading, totals
from batcher.store.lock import RunLock
from batcher.store.output import check_output_target
from batcher.store.spend import Spend

SHARD_ATTEMPTS = 4  # a shard whose worker dies is given to a new one this many times in all


class Locations:
    """Where a cluster run reads and writes: local paths or URIs, from the job file."""

    def __init__(self, job: Job) -> None:
        config = job.config
        folder = job.source.parent
        self.input = storage.resolve(folder, config.input.path)
        self.output = storage.resolve(folder, config.output.path or f"out/{config.name}.parquet")
        checkpoint = config.output.checkpoint_dir
        self.checkpoint = (
            storage.resolve(folder, checkpoint) if checkpoint else self.output + ".checkpoint"
        )
        self.store = storage.join(self.checkpoint, "ray")


def run_on_ray(job: Job, options: RunOptions) -> RunSummary:
    """Run ``job`` on a Ray cluster to its end and return its summary (blocking)."""
    started = time.monotonic()
    config = job.config
    if config.endpoint.mode != "live":
        raise ConfigError(f"{job.source}: endpoint.mode: --ray runs live requests only")
    if options.limit is not None:
        raise ConfigError(f"{job.source}: --limit is not available with --ray")
    where = Locations(job)
    sharded = cut(where.input, config.ray.shard_rows)
    identity = _check(job, options, where, sharded)
    lock = None if storage.is_remote(where.checkpoint) else RunLock(Path(where.checkpoint))
    signals = DriverSignals()
    try:
        if identity is not None:
            _check_journal(job, identity, options.fresh)
        with signals.watching():
            total, flow = _run_locked(job, options, where, sharded, identity, signals)
    finally:
        if lock is not None:
            lock.release()
    return dataclasses.replace(total, flow=flow, wall_s=time.monotonic() - started)


def _run_locked(
    job: Job,
    options: RunOptions,
    where: Locations,
    sharded: ShardedInput,
    identity: dict[str, str] | None,
    signals: DriverSignals,
) -> tuple[RunSummary, FlowReport | None]:
    """The run once the job's lock is held: its shards on the cluster, then the output and
    the job's journal from their parts and journals."""
    config = job.config
    if options.fresh:
        storage.remove_tree(where.store)
    with _simulated(options.simulate) as simulator_url, _cluster(job) as reaper:
        base_url = simulator_url or config.endpoint.base_url
        tasks = [
            ShardTask(
                config=config,
                job_source=str(job.source),
                base_url=base_url,
                sharded=sharded,
                shard=shard,
                store=where.store,
                identity=task_identity(config, sharded, shard),
                scratch=os.environ.get("BATCHER_SCRATCH_DIR"),
                simulate=options.simulate,
                fresh=options.fresh,
                skip_failed=options.skip_failed,
                keep_done=options.keep_done,
                prices_path=options.prices_path,
            )
            for shard in sharded.shards
        ]
        before = 0.0
        if config.limits.max_cost_usd is not None:  # the cap is the job's, over its runs
            own = Path(where.checkpoint) if identity is not None else None
            before = spent_before(own, where.store, [task.shard.name for task in tasks])
        dispatch = _Dispatch(job, options, tasks, reaper, signals, before)
        results, flow = dispatch.run()
    signals.writing = True  # from now on a signal only takes note, as on one machine
    names = [task.shard.name for task in tasks]
    present = [n for n in names if storage.exists(storage.join(where.store, n, PART))]
    write_parts(part_locations(where.store, present), where.output)
    spent: Spend | None = None  # the shards' own, unless the job's journal is here
    if identity is not None:
        merged = merge_journals(Path(where.checkpoint), identity, where.store, present)
        with reading(merged) as connection:
            spent = totals(connection).spent
    stop = dispatch.stop or signals.interrupt()
    summary = _summary(job, options, where.output, sharded.rows, results, stop, spent, before)
    return summary, flow


def _check(
    job: Job, options: RunOptions, where: Locations, sharded: ShardedInput
) -> dict[str, str] | None:
    """Everything a one-machine run checks before it takes the lock (an input in object
    storage: on its first shard); the identity of the job's own journal (None: not on local
    disk)."""
    if storage.is_remote(where.input):
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(scratch)
            write_shard_input(sharded, sharded.shards[0], job.config, work)
            config = shard_config(job.config, job.source, sharded.files[0], work)
            _check_run(Job(config, job.source), options)
        return None
    plan = _check_run(job, options)
    if not storage.is_remote(where.output):
        check_output_target(job.source, job.output_path)
    if storage.is_remote(where.checkpoint) or storage.is_remote(where.output):
        return None
    identity, _ = checkpoint_identity(job, plan.source.key_column)
    return identity


def _check_journal(job: Job, identity: dict[str, str], fresh: bool) -> None:
    """A checkpoint of another job is refused now, not after every shard has run; --fresh
    replaces it now, as on one machine: with the lock held, so a second start leaves the
    checkpoint of the run going on alone. Older checkpoints' absolute spelling is this job's."""
    _, legacy = checkpoint_identity(job, identity["key_column"])
    failure = Journal(
        journal_path(job.checkpoint_dir), identity, fresh=fresh, legacy=legacy
    ).close()
    if failure is not None:
        raise failure


def _check_run(job: Job, options: RunOptions) -> Plan:
    plan = plan_job(
        job, limit=options.limit, simulate=options.simulate, keep_done=options.keep_done
    )

    async def check_output() -> None:
        Run(plan, options)  # the output schema, prices and input columns

    anyio.run(check_output)
    return plan


@contextmanager
def _simulated(simulate: bool) -> Iterator[str | None]:
    if not simulate:
        yield None
        return
    from batcher.sim import SimulatorThread

    with SimulatorThread() as server:
        yield server.url


@contextmanager
def _cluster(job: Job) -> Iterator[Reaper | None]:
    """The cluster to run on: this process's, ``RAY_ADDRESS``'s or ``ray.address``'s, or a
    local one for the run (with a reaper, so it dies with the run)."""
    if ray.is_initialized():
        yield None
        return
    address = os.environ.get("RAY_ADDRESS") or job.config.ray.address
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": "warning"}
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    if address:
        ray.init(address=address, **quiet)
        _keep_sigterm(handler)
        try:
            yield None
        finally:
            ray.shutdown()
        return
    ray.init(address="local", include_dashboard=False, **quiet)
    _keep_sigterm(handler)
    reaper = Reaper()
    reaper.watch()
    try:
        yield reaper
    finally:
        ray.shutdown()
        reaper.close()


def _keep_sigterm(handler: Any) -> None:
    """``ray.init`` puts its own SIGTERM handlers in (they end the driver on the spot); the
    one in force before it (the CLI's: an interrupt, so the cluster is shut down and one line
    printed) is put back."""
    if handler is not None:
        signal.signal(signal.SIGTERM, handler)


class _Dispatch:
    """Shards to workers, in input order; a dead worker's shard goes to a new worker."""

    def __init__(
        self,
        job: Job,
        options: RunOptions,
        tasks: list[ShardTask],
        reaper: Reaper | None,
        signals: DriverSignals,
        spent_usd: float = 0.0,
    ) -> None:
        self.job, self.options, self.tasks, self.reaper = job, options, tasks, reaper
        self.spent_usd = spent_usd  # what the job spent before this run
        self.signals = signals
        self.interrupted = False
        self.results: dict[int, ShardResult] = {}
        # The key and the AWS variables reach the actors as an argument, never through
        # runtime_env, which Ray logs (``secrets.py``).
        self.secrets = WorkerSecrets.of_driver(job, simulate=options.simulate)
        self.pending: deque[ShardTask] = deque()
        self.running: dict[Any, tuple[Any, ShardTask, int]] = {}
        self.attempts: dict[int, int] = {}
        self.idle: list[Any] = []
        self.budget: Any = None
        self.stop: BatcherError | None = None
        # Shards the cap refused while other shards ran (``overlapped``): run again alone.
        self.overlapped: set[int] = set()
        self.deferred: deque[ShardTask] = deque()
        self.budget_bound = False  # start no shard beside another until they have run
        self.cpus_each = 1.0
        self.last_status = time.monotonic()

    def run(self) -> tuple[dict[int, ShardResult], FlowReport | None]:
        for task in self.tasks:
            done = None if task.fresh else done_result(task)
            if done is None:
                self.pending.append(task)
            else:
                self.results[task.shard.index] = done
        if not self.pending:
            return self.results, None
        state = storage.join(self.tasks[0].store, "budget.json")
        self.budget = LimitsActor.remote(  # type: ignore[attr-defined]
            self.job.config.limits, state, uuid.uuid4().hex, self.secrets, self.spent_usd
        )
        try:
            return self._dispatch()
        finally:
            for actor in [self.budget, *self.idle, *(w for w, _, _ in self.running.values())]:
                ray.kill(actor)  # idle actors would hold the cluster's CPUs until collected

    def _dispatch(self) -> tuple[dict[int, ShardResult], FlowReport | None]:
        cpus = ray.cluster_resources().get("CPU", 1)  # type: ignore[no-untyped-call]
        count = self.job.config.ray.workers or max(int(cpus), 1)
        # More workers than CPUs share them: a worker waiting for a CPU another one holds
        # to the end would hold its shard forever.
        self.cpus_each = min(1.0, cpus / count)
        self.idle = [self._worker() for _ in range(min(count, len(self.pending)))]
        while self.pending or self.running or self.deferred:
            self._interrupt()
            if self.budget_bound and not self.running and self.stop is None:
                # The cap refused shards while others held leases: they run again one at a
                # time, alone, so a refusal then is the job's cap, not another's lease.
                if self.deferred:
                    self._start(self.deferred.popleft())
                else:
                    self.budget_bound = False
            while self.idle and self.pending and self.stop is None and not self.budget_bound:
                self._start(self.pending.popleft())
            if not self.running:
                break
            ready, _ = ray.wait(list(self.running), num_returns=1, timeout=1.0)
            if self.reaper is not None:
                self.reaper.watch()
            self._status()
            for ref in ready:
                self._collect(ref)
        flow: FlowReport = ray.get(self.budget.flow_report.remote())
        if self.stop is not None and not isinstance(self.stop, AbortError):
            raise self.stop
        return self.results, flow

    def _start(self, task: ShardTask) -> None:
        worker = self.idle.pop()
        index = task.shard.index
        self.attempts[index] = self.attempts.get(index, 0) + 1
        if self.running:  # it runs beside others: a budget stop may be their leases'
            self.overlapped |= {t.shard.index for _, t, _ in self.running.values()} | {index}
        self.running[worker.run.remote(task)] = (worker, task, self.attempts[index])

    def _interrupt(self) -> None:
        """A first signal: start no shard more, and wind down the ones running."""
        interrupt = self.signals.interrupt()
        if interrupt is None or self.interrupted:
            return
        self.interrupted = True
        self.stop = self.stop or interrupt
        for worker, _, _ in self.running.values():
            worker.interrupt.remote(self.signals.received)
        self.options.notify(
            f"{self.signals.received}: stopping; no shard is started from now on; "
            f"{len(self.running)} shard(s) running finish their requests in flight "
            "(interrupt again to abandon them)"
        )

    def _collect(self, ref: Any) -> None:
        """One shard's end: its result, or its worker's death (then a new worker resumes it)."""
        worker, task, attempt = self.running.pop(ref)
        try:
            result: ShardResult = ray.get(ref)
        except (ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError) as exc:
            died = not isinstance(exc, RayTaskError)
            what = "its worker died" if died else f"it failed ({_first_line(exc)})"
            if attempt >= SHARD_ATTEMPTS:
                self.stop = self.stop or AbortError(
                    f"{task.shard.name}: {what}, {attempt} times; run again to resume"
                )
            else:
                self._notify(f"{task.shard.name}: {what}; it is resumed from its journal")
                # Resumed, not started afresh again: --fresh applied to its first attempt.
                self.pending.appendleft(dataclasses.replace(task, fresh=False))
            self.idle.append(self._worker() if died else worker)
            return
        self.idle.append(worker)
        summary = result.summary
        if summary is None:
            self.stop = self.stop or result.failure
            return
        index = task.shard.index
        earlier = self.results.get(index)
        if earlier is not None and earlier.summary is not None:  # a shard run again
            result = dataclasses.replace(result, summary=_again(earlier.summary, summary))
        self.results[index] = result
        if isinstance(summary.error, BudgetReachedError) and index in self.overlapped:
            self.overlapped.discard(index)
            if self.stop is None:
                self.deferred.append(dataclasses.replace(task, fresh=False))
                self.budget_bound = True
                return
        # The first reason wins, as on one machine; the shards running go on to their end.
        self.stop = self.stop or summary.error
        self._notify(
            f"{task.shard.name} done: {summary.rows_ok} ok, {summary.rows_failed} failed "
            f"({len(self.results)}/{len(self.tasks)} shards)"
        )

    def _status(self) -> None:
        """Every ``--progress-every`` seconds, a line of how far the run is."""
        every = self.options.progress_every_s
        now = time.monotonic()
        if self.options.quiet or every <= 0 or now < self.last_status + every:
            return
        self.last_status = now
        budget: str = ray.get(self.budget.describe.remote())
        self.options.notify(
            f"ray: {len(self.results)}/{len(self.tasks)} shards done, "
            f"{len(self.running)} running; {budget}"
        )

    def _worker(self) -> Any:
        worker = ShardWorker.options(num_cpus=self.cpus_each)  # type: ignore[attr-defined]
        return worker.remote(self.budget, self.secrets)

    def _notify(self, message: str) -> None:
        if not self.options.quiet:
            self.options.notify(message)


def _summary(
    job: Job,
    options: RunOptions,
    output: str,
    input_rows: int,
    results: dict[int, ShardResult],
    stop: BatcherError | None,
    spent: Spend | None = None,
    spent_before_usd: float = 0.0,
) -> RunSummary:
    """The shards' runs added up, as the job's one run: every row of the input (shards that
    never ran are pending), the reason it stopped, ``stop`` (the first the driver saw), and
    what the job spent over all its runs, ``spent`` (from its journal, when it is here; it
    had spent ``spent_before_usd`` before this run)."""
    parts = [r.summary for _, r in sorted(results.items()) if r.summary is not None]
    total = sum(parts, RunSummary(Path(output)))
    error = stop or total.error
    cap = job.config.limits.max_cost_usd
    rows_total = input_rows * len(job.config.request.models)
    resume = options.resume_command or f"batcher run {job.source} --ray"
    if spent is None:  # the shards' own, unless the job's journal is here
        spent = Spend(total.job_cost_usd or 0.0, total.job_unpriced_rows)
    if isinstance(error, BudgetReachedError) and cap is not None:
        # The job's spending over its runs, not one shard's.
        job_usd = max(spent.cost_usd, spent_before_usd + total.cost_usd)
        error = budget_reached(
            cap, job_usd, request_usd=error.request_usd, output_limited=error.output_limited
        )
    return dataclasses.replace(
        total,
        output_path=Path(output),
        rows_total=rows_total,
        rows_pending=rows_total - total.rows_ok - total.rows_failed,
        error=error,
        aborted=str(error) if error is not None else None,
        resume_command=resume
        if error is not None and not isinstance(error, BudgetReachedError)
        else None,
        job_cost_usd=spent.cost_usd,
        job_unpriced_rows=spent.unpriced_rows,
    )


def _again(first: RunSummary, then: RunSummary) -> RunSummary:
    """A shard's two runs within one job run: what both sent and spent, the rows as the
    second left them (it counts the first one's rows as done before it)."""
    both = first + then
    return dataclasses.replace(
        both,
        rows_total=then.rows_total,
        rows_ok=then.rows_ok,
        rows_failed=then.rows_failed,
        rows_pending=then.rows_pending,
        rows_skipped=first.rows_skipped,
        output_cost_usd=then.output_cost_usd,
        output_unpriced_rows=then.output_unpriced_rows,
        job_cost_usd=then.job_cost_usd,
        job_unpriced_rows=then.job_unpriced_rows,
        error=then.error,
        aborted=then.aborted,
        resume_command=then.resume_command,
    )


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip()
    return text.splitlines()[-1] if text else type(cause).__name__
