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
from typing import Any
from urllib.parse import urlsplit

import orjson
import polars as pl

from batcher.config import Job
from batcher.errors import ConfigError
from batcher.images import ImageLoader
from batcher.journal import Previous
from batcher.request import ImagePart, RequestBuilder, RowRequest
from batcher.source import Source

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


@dataclass(frozen=True, slots=True)
class Unchanged:
    """A row whose inputs are those of its journal outcome: its request would be the same."""

    key: Any
    fingerprint: bytes


Prepared = RowRequest | RowFailure | Unchanged
Lookup = Callable[[list[Any]], dict[Any, Previous]]


class Plan:
    """A job checked against its input, ready to run."""

    def __init__(
        self, job: Job, *, limit: int | None = None, api_key_required: bool = True
    ) -> None:
        config = job.config
        self.job = job
        self.limit = limit
        self.source = Source(job.input_path, config.input.id_column, config.input.dtypes)
        columns = set(self.source.columns)
        try:
            self.builder = RequestBuilder(config.request, config.endpoint.base_url)
        except ConfigError as exc:
            raise ConfigError(f"{job.source}: {exc}") from None
        self.images = ImageLoader(job.image_root, config.images)
        where = str(job.source)
        missing = [c for c in self.builder.columns if c not in columns]
        if missing:
            raise ConfigError(
                f"{where}: request.prompt uses column(s) {', '.join(missing)} that the input "
                f"{job.input_path} does not have (columns: {', '.join(self.source.columns)})"
            )
        for name in config.request.images:
            if name not in columns:
                raise ConfigError(
                    f"{where}: request.images names column {name!r} that the input does not have"
                )
        kept = config.output.keep_columns
        if kept is None:
            kept = [c for c in self.source.columns if c != self.source.key_column]
        unknown = [c for c in kept if c not in columns]
        if unknown:
            raise ConfigError(
                f"{where}: output.keep_columns names column(s) {', '.join(unknown)} "
                "that the input does not have"
            )
        self.keep_columns = [c for c in kept if c != self.source.key_column]
        self.row_columns = sorted(set(self.builder.columns) | set(config.request.images))
        self.source.check_keys()
        rows = self.source.count_rows()
        if rows == 0:
            raise ConfigError(f"{job.input_path}: the input has no rows: there is nothing to send")
        self.total_rows = rows if limit is None else min(rows, limit)
        self.allow_nulls = config.input.allow_nulls
        self._check_rendering(where)
        self.api_key = read_api_key(job, required=api_key_required)
        self.output_path = job.output_path

    def _check_rendering(self, where: str) -> None:
        """Render the first rows: an error every one of them meets (``{{ text.foo.bar }}``)
        would fail every row of the run, so it stops the run here instead."""
        columns = self.builder.columns or [self.source.key_column]
        try:
            sample = self.source.frame().select(columns).head(PREFLIGHT_ROWS).collect()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise ConfigError(str(self.source.read_error(exc))) from None
        first: tuple[str, Exception] | None = None
        for row in sample.iter_rows(named=True):
            if self._null_column(row) is not None:
                continue  # that row fails alone as input_error
            failed = self.builder.render_error(row)
            if failed is None:
                return
            first = first or failed
        if first is not None:
            template, error = first
            hint = ""
            if isinstance(error, TypeError) and self.source.format == "csv":
                hint = " (CSV columns are text unless input.dtypes declares a type)"
            raise ConfigError(
                f"{where}: {template}: rendering the input's first rows fails: "
                f"{type(error).__name__}: {error}{hint}"
            )

    def _null_column(self, row: dict[str, Any]) -> str | None:
        if self.allow_nulls:
            return None
        return next((c for c in self.builder.columns if row[c] is None), None)

    def batches(self, *, batch_rows: int = 5_000) -> Iterator[pl.DataFrame]:
        return self.source.batches(self.row_columns, limit=self.limit, batch_rows=batch_rows)

    def prepare(
        self,
        batch: pl.DataFrame,
        lookup: Lookup | None = None,
        reuse: Callable[[Previous], bool] = lambda previous: True,
    ) -> list[tuple[Any, Prepared, Previous | None]]:
        """Each row of a batch, in order: key, what to do with it, its journal outcome.

        A row whose journal outcome has the same input digest (and passes ``reuse``) is
        ``Unchanged`` and is not rendered again; image rows are always prepared in full,
        since their files may have changed. Blocking: run in a worker thread.
        """
        keys = normalise_keys(batch.get_column(self.source.key_column))
        known = lookup(keys) if lookup is not None else {}
        image_columns = self.job.config.request.images
        prepared: list[tuple[Any, Prepared, Previous | None]] = []
        for key, row in zip(keys, batch.iter_rows(named=True), strict=True):
            previous = known.get(key)
            digest = None if image_columns else self.builder.input_digest(row)
            if (
                previous is not None
                and digest is not None
                and previous.input_digest == digest
                and reuse(previous)
            ):
                prepared.append((key, Unchanged(key, previous.fingerprint), previous))
                continue
            prepared.append((key, self._prepare_row(key, row, image_columns, digest), previous))
        return prepared

    def _prepare_row(
        self, key: Any, row: dict[str, Any], image_columns: list[str], digest: bytes | None
    ) -> RowRequest | RowFailure:
        null = self._null_column(row)
        if null is not None:
            return _failure(key, "input_error", f"{null} is null", row, digest)
        images: tuple[ImagePart, ...] = ()
        if image_columns:
            loaded = self.images.describe(row, image_columns)
            if isinstance(loaded, str):
                return _failure(key, "image_error", loaded, row)
            images = loaded
        try:
            return self.builder.build(key, row, images, digest)
        except Exception as exc:  # a user's template can raise anything: that row fails
            return _failure(key, "template_error", f"{type(exc).__name__}: {exc}", row, digest)


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


def normalise_keys(column: pl.Series) -> list[Any]:
    """Keys as the journal stores them: integers stay integers, anything else is text."""
    if column.dtype.is_integer():
        return column.to_list()
    return column.cast(pl.String).to_list()


def key_expression(column: str, dtype: pl.DataType) -> pl.Expr:
    """The same normalisation as ``normalise_keys``, as a polars expression."""
    expression = pl.col(column)
    return expression if dtype.is_integer() else expression.cast(pl.String)


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
    key = os.environ.get(endpoint.api_key_env) or None
    if key is None and required and not is_loopback(endpoint.base_url):
        raise ConfigError(
            f"{job.source}: endpoint.api_key_env: environment variable "
            f"{endpoint.api_key_env} is not set (it must hold the API key for "
            f"{endpoint.base_url})"
        )
    return key
