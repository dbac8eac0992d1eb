"""Pre-flight: check a job against its input before anything is sent, and prepare row batches.

Everything a user can get wrong in the job file or the data is found here, so a run that
starts has a template whose columns exist, a unique key, a key for the endpoint, and an
output path it can write.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import polars as pl

from batcher.config import Job, load_job
from batcher.errors import ConfigError
from batcher.rows.images import ImageLoader
from batcher.rows.paths import check_paths
from batcher.rows.request import ImagePart, RequestBuilder, RowRequest
from batcher.rows.source import Source
from batcher.store.columns import Outcome
from batcher.store.journal import Previous
from batcher.store.keys import REQUEST_MODEL, journal_key, normalise_keys
from batcher.store.output import OutputRows

# Pre-flight renders up to this many rows: a template error on all of them is the template's,
# not a row's, and is reported before anything is sent.
PREFLIGHT_ROWS = 100


@dataclass(frozen=True, slots=True)
class RowFailure:
    """A row that fails before any request (a missing image, a template error)."""

    key: Any
    fingerprint: bytes
    kind: str
    message: str
    input_digest: bytes | None = None

    def outcome(self) -> Outcome:
        return Outcome.failed(
            self.key, self.fingerprint, self.kind, self.message, input_digest=self.input_digest
        )


@dataclass(frozen=True, slots=True)
class Unchanged:
    """A row whose journal outcome stands: its inputs are those it was answered for (or
    ``--keep-done`` keeps it), so it is neither rendered nor sent again."""

    key: Any
    fingerprint: bytes


Prepared = RowRequest | RowFailure | Unchanged
Lookup = Callable[[list[Any]], dict[Any, Previous]]
SIMULATOR_URL = "batcher-simulator"  # what --simulate runs fingerprint as, whatever the port


@dataclass(frozen=True, slots=True, eq=False)
class Plan:
    """A job checked against its input, ready to run: facts, and the services built from
    them once (the input, the request builder, the image loader), handed to every stage."""

    job: Job
    source: Source
    builder: RequestBuilder
    images: ImageLoader
    keep_columns: list[str]  # input columns the output keeps, the key column aside
    row_columns: list[str]  # input columns a request reads
    input_rows: int  # within --limit
    limit: int | None  # None: every row (also for a limit past the input's end)
    keep_done: bool  # keep every row answered successfully, whatever its request is now
    api_key: str | None

    @property
    def models(self) -> list[str]:
        return self.builder.models

    @property
    def multiple_models(self) -> bool:
        return self.builder.multiple_models

    @property
    def total_rows(self) -> int:
        """Output rows: one per input row and model."""
        return self.input_rows * len(self.models)

    @property
    def output_path(self) -> Path:
        return self.job.output_path

    def batches(self, *, batch_rows: int = 5_000) -> Iterator[pl.DataFrame]:
        return self.source.batches(self.row_columns, limit=self.limit, batch_rows=batch_rows)

    def journal_key(self, key: Any, model: str) -> Any:
        return journal_key(key, model, self.multiple_models)

    def decide(
        self, batch: pl.DataFrame, lookup: Lookup, *, skip_failed: bool
    ) -> list[tuple[Any, Prepared]]:
        """Send, skip or record, the one place it is decided, for every mode: each row of a
        batch and model in order, with its journal key, as ``Unchanged`` (its outcome stands:
        skip it), a ``RowFailure`` (record it, nothing to send) or a ``RowRequest`` (send it).
        A failed outcome stands only with ``skip_failed``, a row stopped mid-way never
        (``Previous.stands``). Blocking: run in a worker thread."""
        return [
            (key, Unchanged(key, item.fingerprint))
            if not isinstance(item, Unchanged)
            and previous is not None
            and previous.fingerprint == item.fingerprint
            and previous.stands(skip_failed)
            else (key, item)
            for key, item, previous in self.prepare(batch, lookup, lambda p: p.stands(skip_failed))
        ]

    def prepare(
        self,
        batch: pl.DataFrame,
        lookup: Lookup | None = None,
        reuse: Callable[[Previous], bool] = lambda previous: True,
    ) -> list[tuple[Any, Prepared, Previous | None]]:
        """Each row of a batch and model, in order: journal key, what to do, its outcome.

        A row whose journal outcome has the same input digest (and passes ``reuse``) is
        ``Unchanged`` and is not rendered again; an image row's digest holds each local
        image's size and modification time, so an unchanged image is not read either. With
        ``keep_done`` a successful outcome is kept whatever the request is now. Blocking:
        run in a worker thread.
        """
        keys = normalise_keys(batch.get_column(self.source.key_column))
        models = self.models
        journal_keys = [self.journal_key(key, model) for key in keys for model in models]
        known = lookup(journal_keys) if lookup is not None else {}
        image_columns = self.job.config.request.images
        prepared: list[tuple[Any, Prepared, Previous | None]] = []
        rows = iter(journal_keys)
        for row in batch.iter_rows(named=True):
            images: tuple[ImagePart, ...] | str | None = None  # described once for all models
            signature = self.images.signature(row, image_columns) if image_columns else ""
            for model in models:
                key = next(rows)
                previous = known.get(key)
                if previous is not None and self.keep_done and previous.ok:
                    prepared.append((key, Unchanged(key, previous.fingerprint), previous))
                    continue
                digest = self.builder.input_digest(row, model, signature)
                if previous is not None and previous.input_digest == digest and reuse(previous):
                    prepared.append((key, Unchanged(key, previous.fingerprint), previous))
                    continue
                if images is None:
                    images = self.images.describe(row, image_columns) if image_columns else ()
                item = self._prepare_row(key, row, images, digest, model)
                prepared.append((key, item, previous))
        return prepared

    def current(self, batch: pl.DataFrame, known: dict[Any, Previous]) -> list[bool]:
        """For each row of a batch and model, in order: whether its journal outcome in
        ``known`` stands for the row as it is now (the output rebuild's predicate). Decided by
        input digests: no request is rendered and no image read, but for an outcome whose
        inputs changed (or that an older journal stored without a digest)."""
        keys = normalise_keys(batch.get_column(self.source.key_column))
        image_columns = self.job.config.request.images
        stands: list[bool] = []
        rows = iter([self.journal_key(key, model) for key in keys for model in self.models])
        for row in batch.iter_rows(named=True):
            signature: str | None = None
            for model in self.models:
                key = next(rows)
                previous = known.get(key)
                if previous is None or (self.keep_done and previous.ok):
                    stands.append(previous is not None)
                    continue
                if signature is None:
                    signature = self.images.signature(row, image_columns) if image_columns else ""
                digest = self.builder.input_digest(row, model, signature)
                if previous.input_digest != digest:
                    images = self.images.describe(row, image_columns) if image_columns else ()
                    item = self._prepare_row(key, row, images, digest, model)
                    stands.append(item.fingerprint == previous.fingerprint)
                    continue
                stands.append(True)
        return stands

    def output_rows(self) -> OutputRows:
        """The rows as the output rebuild reads them, with this plan's predicate."""
        source = self.source
        key = source.key_column
        return OutputRows(
            key_column=key,
            key_type=source.schema[key] if key in source.schema else pl.Int64(),
            kept_schema={c: source.schema[c] for c in self.keep_columns},
            keep_columns=self.keep_columns,
            models=self.models if self.multiple_models else None,
            read_columns=sorted(set(self.row_columns) | set(self.keep_columns)),
            limit=self.limit,
            path=self.output_path,
            batches=source.batches,
            current=self.current,
        )

    def _prepare_row(
        self,
        key: Any,
        row: dict[str, Any],
        images: tuple[ImagePart, ...] | str,
        digest: bytes | None,
        model: str,
    ) -> RowRequest | RowFailure:
        null = self._null_column(row)
        if null is not None:
            return _failure(key, "input_error", f"{null} is null", row, digest)
        if isinstance(images, str):
            return _failure(key, "image_error", images, row)
        try:
            return self.builder.build(key, row, images, digest, model)
        except Exception as exc:  # a user's template can raise anything: that row fails
            return _failure(key, "template_error", f"{type(exc).__name__}: {exc}", row, digest)

    def _null_column(self, row: dict[str, Any]) -> str | None:
        if self.job.config.input.allow_nulls:
            return None
        return next((c for c in self.builder.columns if row[c] is None), None)


def _check_rendering(
    job: Job, source: Source, builder: RequestBuilder, null_column: Callable[..., str | None]
) -> None:
    """Render the first rows: an error every one of them meets (``{{ text.foo.bar }}``) would
    fail every row of the run, so it stops the run here instead."""
    columns = builder.columns or [source.key_column]
    try:
        sample = source.frame().select(columns).head(PREFLIGHT_ROWS).collect()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise ConfigError(str(source.read_error(exc))) from None
    first: tuple[str, Exception] | None = None
    for row in sample.iter_rows(named=True):
        if null_column(row) is not None:
            continue  # that row fails alone as input_error
        failed = builder.render_error(row)
        if failed is None:
            return
        first = first or failed
    if first is not None:
        template, error = first
        hint = ""
        if isinstance(error, TypeError) and source.format == "csv":
            hint = " (CSV columns are text unless input.dtypes declares a type)"
        raise ConfigError(
            f"{job.source}: {template}: rendering the input's first rows fails: "
            f"{type(error).__name__}: {error}{hint}"
        )


def _kept_columns(job: Job, source: Source, builder: RequestBuilder) -> list[str]:
    """The input columns the output keeps, once every column the job names is checked."""
    config, where = job.config, str(job.source)
    columns = set(source.columns)
    missing = [c for c in builder.columns if c not in columns]
    if missing:
        raise ConfigError(
            f"{where}: request.prompt uses column(s) {', '.join(missing)} that the input "
            f"{job.input_path} does not have (columns: {', '.join(source.columns)})"
        )
    for name in config.request.images:
        if name not in columns:
            raise ConfigError(
                f"{where}: request.images names column {name!r} that the input does not have"
            )
    kept = config.output.keep_columns
    if kept is None:
        kept = [c for c in source.columns if c != source.key_column]
    unknown = [c for c in kept if c not in columns]
    if unknown:
        raise ConfigError(
            f"{where}: output.keep_columns names column(s) {', '.join(unknown)} "
            "that the input does not have"
        )
    kept = [c for c in kept if c != source.key_column]
    if builder.multiple_models and REQUEST_MODEL in kept:
        raise ConfigError(
            f"{where}: the input column {REQUEST_MODEL!r} clashes with the output column "
            "of a model list; drop it from output.keep_columns or rename it"
        )
    return kept


def plan_job(
    job: Job | str | Path,
    *,
    limit: int | None = None,
    simulate: bool = False,
    keep_done: bool = False,
    api_key_required: bool = True,
) -> Plan:
    """Load and check everything a run needs, once; raises ConfigError before anything is
    sent. With ``simulate`` the job is fingerprinted as the simulator's and needs no key."""
    if not isinstance(job, Job):
        job = load_job(job)
    if simulate:
        endpoint = job.config.endpoint.model_copy(update={"base_url": SIMULATOR_URL})
        job = Job(job.config.model_copy(update={"endpoint": endpoint}), job.source)
    config = job.config
    if keep_done and config.input.id_column is None:
        # Rows keyed by position: a row inserted into the input would take the answer of the
        # row that was there before it.
        raise ConfigError(
            f"{job.source}: --keep-done needs input.id_column: rows keyed by their position "
            "would keep the answers of the rows that were there before"
        )
    source = Source(job.input_path, config.input.id_column, config.input.dtypes)
    check_paths(job, source.files, source.pattern)
    try:
        builder = RequestBuilder(config.request, config.endpoint.base_url)
    except ConfigError as exc:
        raise ConfigError(f"{job.source}: {exc}") from None
    images = ImageLoader(job.image_root, config.images)
    keep_columns = _kept_columns(job, source, builder)
    source.check_keys()
    input_rows = source.count_rows(limit)
    if input_rows == 0 and limit != 0:
        raise ConfigError(f"{job.input_path}: the input has no rows: there is nothing to send")
    if limit is not None and limit > input_rows:
        limit = None  # past the input's end it limits nothing (nor overflows polars)
    plan = Plan(
        job=job,
        source=source,
        builder=builder,
        images=images,
        keep_columns=keep_columns,
        row_columns=sorted(set(builder.columns) | set(config.request.images)),
        input_rows=input_rows,
        limit=limit,
        keep_done=keep_done,
        api_key=None if simulate else read_api_key(job, required=api_key_required),
    )
    _check_rendering(job, source, builder, plan._null_column)
    return plan


def _failure(
    key: Any, kind: str, message: str, row: dict[str, Any], digest: bytes | None = None
) -> RowFailure:
    # Fingerprinted by what the row asked for, not by the message, which may vary by run.
    basis = orjson.dumps(
        [kind, row], option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str
    )
    fingerprint = hashlib.blake2b(basis, digest_size=16).digest()
    return RowFailure(
        key=key, fingerprint=fingerprint, kind=kind, message=message, input_digest=digest
    )


def is_loopback(base_url: str) -> bool:
    host = urlsplit(base_url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(job: Job, *, required: bool) -> str | None:
    """The key from the named variable; never put it in a message."""
    endpoint = job.config.endpoint
    # Surrounding whitespace is a CRLF .env's "\r" or a pasted newline, never part of a key.
    key = os.environ.get(endpoint.api_key_env, "").strip() or None
    if key is not None and not all(" " < character < "\x7f" for character in key):
        # A header cannot carry it, and a transport's error would quote it.
        raise ConfigError(
            f"{job.source}: endpoint.api_key_env: the key in ${endpoint.api_key_env} contains "
            "a space, control or non-ASCII character; check how it was set"
        )
    if key is None and required and not is_loopback(endpoint.base_url):
        raise ConfigError(
            f"{job.source}: endpoint.api_key_env: environment variable "
            f"{endpoint.api_key_env} is not set (it must hold the API key for "
            f"{endpoint.base_url})"
        )
    return key
