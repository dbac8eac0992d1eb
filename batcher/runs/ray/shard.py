"""One shard run by batcher's own engine, on one worker, with its journal kept safe elsewhere.

A shard works in a local folder: its rows as a Parquet input, its SQLite journal, its part of
the output. The run is the one-machine run (``runs.shell.Run``: pacing, retries, journal, parse,
cost) on that input, paced by leases from the shared budget. Every ``SYNC_S`` seconds a
consistent copy of the journal's committed rows goes to the checkpoint location, and a shard
started anywhere first takes the fuller of its local journal and that copy, so a killed
worker re-sends only what was in flight and what was answered since the last copy. A shard is
done when its part, its final journal and its ``done.json`` are at the checkpoint location.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import orjson
from anyio.lowlevel import EventLoopToken

from batcher.config import Job, JobConfig, LimitsConfig
from batcher.errors import BatcherError
from batcher.flow.controller import FlowController
from batcher.rows.plan import plan_job
from batcher.rows.source import ROW_INDEX
from batcher.runs.ray import storage
from batcher.runs.ray.allowance import AllowanceSource, LeasedBudget
from batcher.runs.ray.lease import LeasedPacer, LeaseSource, SharedFlow
from batcher.runs.ray.shards import Shard, ShardedInput, read_shard
from batcher.runs.shell import Run, RunOptions
from batcher.runs.summary import RunSummary
from batcher.send.budget import Budget, CostBudget
from batcher.store.files import replacing
from batcher.store.journal import journal_path

SYNC_S = 2.0  # how often a shard's journal is copied to the checkpoint location
FIRST_COPY_S = 0.2  # until the first copy, how often to look whether the journal is open
JOURNAL = "journal.sqlite"
PART = "part.parquet"
INPUT = "input.parquet"
DONE = "done.json"


@dataclass(frozen=True, slots=True)
class ShardTask:
    """Everything a worker needs to run one shard."""

    config: JobConfig
    job_source: str
    base_url: str
    sharded: ShardedInput
    shard: Shard
    store: str  # the job's checkpoint location for shards (a folder or a URI)
    identity: str  # the job and shard this work belongs to (see ``task_identity``)
    scratch: str | None = None  # the local folder for shard work (None: the system's temp)
    simulate: bool = False
    fresh: bool = False
    skip_failed: bool = False
    keep_done: bool = False
    prices_path: str | None = None

    @property
    def location(self) -> str:
        return storage.join(self.store, self.shard.name)


@dataclass(frozen=True, slots=True)
class ShardResult:
    """What one shard's run did: its summary (its error, if it stopped early, included), or
    the error it failed with before it had one. From ``done.json``: what it did before."""

    index: int
    summary: RunSummary | None = None
    failure: BatcherError | None = None  # the run raised (a config error, a busy journal)
    done_before: bool = False  # skipped: done by an earlier run
    unpriced_rows: int = 0
    output_unpriced_rows: int = 0
    # The shard's journal: what its rows cost over every run, rows asked again included.
    job_cost_usd: float = 0.0
    job_unpriced_rows: int = 0


def task_identity(config: JobConfig, sharded: ShardedInput, shard: Shard) -> str:
    """A digest of what decides a shard's output: the job (but how it is spread) and the
    shard's place in the input. A changed prompt makes every shard run again (from its
    journal, so only the rows whose request changed are sent)."""
    job = config.model_dump(mode="json", exclude={"ray"})
    where = {"files": sharded.files, "offset": shard.offset, "rows": shard.rows}
    text = orjson.dumps({"job": job, "shard": where}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(text).hexdigest()


def done_result(task: ShardTask) -> ShardResult | None:
    """The shard's result if an earlier run finished it for this very job, else None.

    A shard with failed rows is run again (from its journal) like a one-machine rerun,
    which retries failed rows, unless ``--skip-failed``.
    """
    data = storage.read_bytes(storage.join(task.location, DONE))
    if data is None:
        return None
    done = orjson.loads(data)
    if done.get("identity") != task.identity:
        return None
    # The counts a later run reports of it (an earlier version's done.json has them too).
    result = done["result"]
    total, ok = int(result["rows_total"]), int(result["rows_ok"])
    failed = int(result["rows_failed"])
    if failed and not task.skip_failed:
        return None
    summary = RunSummary(
        Path(PART),
        rows_total=total,
        rows_ok=ok,
        rows_failed=failed,
        rows_pending=total - ok - failed,
        rows_skipped=total,
        output_cost_usd=float(result["output_cost_usd"]),
        output_unpriced_rows=int(result.get("output_unpriced_rows", 0)),
        job_cost_usd=float(result.get("job_cost_usd", 0.0)),
        job_unpriced_rows=int(result.get("job_unpriced_rows", 0)),
    )
    return ShardResult(task.shard.index, summary, done_before=True)


def scratch_root(store: str, scratch: str | None) -> Path:
    """This node's working folder for the shards of the job whose checkpoint is ``store``:
    under ``scratch`` (``BATCHER_SCRATCH_DIR``) or the system's temporary folder."""
    digest = hashlib.sha256(store.encode()).hexdigest()[:16]
    return Path(scratch or tempfile.gettempdir()) / "batcher-ray" / digest


class Interruption:
    """The driver's interrupt, for the shard runs of one worker: handed to the run going on
    (on its own event loop: its signal watcher is for a main thread, and a worker's signals
    are the cluster's), and to any run started after it, which then stops at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._signal: str | None = None
        self._run: tuple[Run, EventLoopToken] | None = None

    def interrupt(self, signal_name: str) -> None:
        """Wind the run down as that signal would on one machine (from any thread)."""
        with self._lock:
            self._signal = signal_name
            current = self._run
        if current is None:
            return
        run, token = current
        with suppress(RuntimeError):  # the run's event loop has ended: its output is written
            anyio.from_thread.run_sync(
                run.stopping.interrupt, signal_name, run.engine.interrupted, token=token
            )

    @contextmanager
    def watching(self, run: Run) -> Iterator[None]:
        """While ``run`` runs (entered on its event loop), an interrupt reaches it."""
        with self._lock:
            self._run = (run, anyio.lowlevel.current_token())
            name = self._signal
        if name is not None:
            run.stopping.interrupt(name, run.engine.interrupted)
        try:
            yield
        finally:
            with self._lock:
                self._run = None


def run_shard(
    task: ShardTask,
    source: LeaseSource | None,
    allowance: AllowanceSource | None = None,
    interruption: Interruption | None = None,
) -> ShardResult:
    """Run one shard to its end (blocking). ``source``: where slots come from, ``allowance``:
    where dollars come from (None: the shard paces itself and keeps the cap to itself, as
    one machine would), ``interruption``: how the driver interrupts it. A run failure comes
    back as data."""
    try:
        return _run_shard(task, source, allowance, interruption or Interruption())
    except BatcherError as exc:
        return ShardResult(task.shard.index, failure=exc)


def _run_shard(
    task: ShardTask,
    source: LeaseSource | None,
    allowance: AllowanceSource | None,
    interruption: Interruption,
) -> ShardResult:
    work = scratch_root(task.store, task.scratch) / task.shard.name
    if task.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / INPUT).exists():
        write_shard_input(task.sharded, task.shard, task.config, work)
    journal = journal_path(work / "checkpoint")
    stored_journal = storage.join(task.location, JOURNAL)
    if not task.fresh:
        _take_fuller_journal(journal, stored_journal)
    # The job file's place decides the journal's identity (paths relative to it): one in
    # the shard's folder keeps it the same wherever the shard runs.
    config = shard_config(task.config, Path(task.job_source), task.sharded.files[0], work)
    job = Job(config, work / "job.yaml")

    def flow_factory(limits: LimitsConfig) -> FlowController:
        if source is None:
            return FlowController(limits)
        return SharedFlow(limits, LeasedPacer(source))

    leased: list[LeasedBudget] = []

    def budget_factory(local: Budget) -> CostBudget:
        if allowance is None:
            return local
        # One holder per attempt: a retried shard's dead attempt keeps its lease counted.
        leased.append(LeasedBudget(local, allowance, f"{task.shard.name}/{uuid.uuid4().hex}"))
        return leased[-1]

    options = RunOptions(
        simulate=task.simulate,
        fresh=task.fresh,
        skip_failed=task.skip_failed,
        keep_done=task.keep_done,
        quiet=True,
        progress_every_s=0,
        prices_path=task.prices_path,
        notify=lambda _message: None,
        flow_factory=flow_factory,
        budget_factory=budget_factory,
    )
    plan = plan_job(
        job, limit=options.limit, simulate=options.simulate, keep_done=options.keep_done
    )

    async def execute() -> RunSummary:
        run = Run(plan, options)
        with interruption.watching(run):
            return await run.execute(task.base_url)

    try:
        with _JournalCopier(journal, stored_journal), ThreadPoolExecutor(1) as thread:
            # In a thread of its own: the run's signal handling is for a main thread, and a
            # worker's signals are the cluster's business.
            summary = thread.submit(anyio.run, execute).result()
    finally:
        for budget in leased:
            budget.give_back()
    storage.upload(plan.output_path, storage.join(task.location, PART))
    if summary.error is None:
        counts = {
            "index": task.shard.index,  # an earlier version reads its result by these names
            "rows_total": summary.rows_total,
            "rows_ok": summary.rows_ok,
            "rows_failed": summary.rows_failed,
            "output_cost_usd": summary.output_cost_usd,
            "output_unpriced_rows": summary.output_unpriced_rows,
            "job_cost_usd": summary.job_cost_usd or 0.0,
            "job_unpriced_rows": summary.job_unpriced_rows,
        }
        done = {"identity": task.identity, "result": counts}
        storage.write_bytes(storage.join(task.location, DONE), orjson.dumps(done))
        shutil.rmtree(work, ignore_errors=True)  # everything is at the checkpoint location
    return ShardResult(task.shard.index, summary)


def shard_config(config: JobConfig, job_source: Path, first_file: str, work: Path) -> JobConfig:
    """The job as one machine would run it on a shard's rows alone (``work/input.parquet``)."""
    image_root = config.input.image_root
    root = storage.resolve(job_source.parent, image_root) if image_root else None
    if root is None and not storage.is_remote(first_file):
        root = str(Path(first_file).parent)
    return config.model_copy(
        update={
            "input": config.input.model_copy(
                update={
                    "path": str(work / INPUT),
                    "id_column": config.input.id_column or ROW_INDEX,
                    "image_root": root,
                }
            ),
            "output": config.output.model_copy(
                update={"path": str(work / PART), "checkpoint_dir": str(work / "checkpoint")}
            ),
        }
    )


def write_shard_input(sharded: ShardedInput, shard: Shard, config: JobConfig, work: Path) -> None:
    """The shard's rows as its run's input, written whole."""
    frame = read_shard(sharded, shard, config.input.id_column)
    with replacing(work / INPUT) as temporary:
        frame.write_parquet(temporary)


def _outcomes(path: Path) -> int:
    if not path.exists():
        return -1
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return int(connection.execute("SELECT count(*) FROM outcomes").fetchone()[0])
        finally:
            connection.close()
    except sqlite3.Error:
        return -1


def _take_fuller_journal(local: Path, stored: str) -> None:
    """Start from the local journal or the stored copy, whichever holds more rows. The
    checkpoint location is the truth: with no copy there (deleted, or never made), a local
    journal left by an earlier run is not used either."""
    files = [local, local.with_name(local.name + "-wal"), local.with_name(local.name + "-shm")]
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / JOURNAL
        if not storage.download(stored, copy):
            for stale in files:
                stale.unlink(missing_ok=True)
            return
        if _outcomes(copy) > _outcomes(local):
            local.parent.mkdir(parents=True, exist_ok=True)
            for stale in files:
                stale.unlink(missing_ok=True)
            shutil.copyfile(copy, local)


def copy_journal(local: Path, stored: str) -> bool:
    """Put a consistent copy of the journal's committed rows at ``stored``; False if there
    is no journal yet."""
    if not local.exists():
        return False
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / JOURNAL
        source = sqlite3.connect(f"file:{local}?mode=ro", uri=True)
        target = sqlite3.connect(copy)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        storage.upload(copy, stored)
    return True


class _JournalCopier:
    """Copies the journal as soon as the run has opened it, then every ``SYNC_S`` seconds
    while the shard runs, and once at the end. The first copy marks the local journal as
    this checkpoint's (see ``_take_fuller_journal``)."""

    def __init__(self, local: Path, stored: str) -> None:
        self.local, self.stored = local, stored
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="batcher-journal-copy", daemon=True)

    def __enter__(self) -> _JournalCopier:
        self._thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        copy_journal(self.local, self.stored)

    def _loop(self) -> None:
        copied = False
        while not self._stop.wait(SYNC_S if copied else FIRST_COPY_S):
            try:
                copied = copy_journal(self.local, self.stored) or copied
            except (OSError, sqlite3.Error):
                continue  # the next copy will do; the local journal is intact
