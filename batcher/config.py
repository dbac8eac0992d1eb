"""The job file: pydantic models of every key, YAML loading, ``${VAR}`` and ``--set`` overrides.

pydantic lives only here, at the boundary; the models are frozen so the rest of the pipeline
reads them without copying.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from batcher.errors import ConfigError

DEFAULT_BASE_URL = "https://gateway.theturbo.ai/v1"
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# The keys whose ``${VAR}`` is replaced from the environment: where a job names a file, a
# server, the variable holding its key or a model, which differ by machine. Nowhere else: a
# ``request.prompt: "${AWS_SECRET_ACCESS_KEY}"`` would send the secret to the server and write
# it into the output, and a prompt may well mean ``${x}`` as text (a shell or JS snippet).
ENV_KEYS = frozenset(
    {
        "name",
        "input.path",
        "input.image_root",
        "output.path",
        "output.checkpoint_dir",
        "endpoint.base_url",
        "endpoint.api_key_env",
        "request.model",  # and each model of a list
        "ray.address",
    }
)
_DEFAULT_PORTS = {"http": 80, "https": 443}
# A job name becomes a file name (out/<name>.parquet): no folders, no hidden files.
_SAFE_NAME = re.compile(r"[^./\\\x00-\x1f][^/\\\x00-\x1f]*")
# The types input.dtypes may declare; every other input column is read as it is stored
# (CSV: text).
InputType = Literal["string", "int64", "float64", "bool", "date"]


class _Section(BaseModel):
    # strict: `concurrency: true` or `stream: 1` is a mistake, not a number or a flag.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class InputConfig(_Section):
    path: str
    id_column: str | None = None
    image_root: str | None = None
    dtypes: dict[str, InputType] = Field(default_factory=dict)
    allow_nulls: bool = False


class EndpointConfig(_Section):
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "BATCHER_API_KEY"
    timeout_s: float = Field(default=120, gt=0)
    stream_idle_timeout_s: float = Field(default=30, gt=0)
    # Counted after decompression, streams too. The largest real replies (n=128 choices of a
    # long answer, with logprobs) are a few MiB; 32 MiB only stops a broken or hostile server,
    # and bounds what one attempt can hold in memory.
    max_response_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    transport: Literal["aiohttp", "httpx"] = "aiohttp"
    mode: Literal["live", "batch"] = "live"

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https"):
            raise ValueError("must start with http:// or https://")
        if any(character.isspace() for character in value):
            raise ValueError("must not contain spaces")
        if not parts.hostname:
            raise ValueError("has no host name")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number in range
        except ValueError:
            raise ValueError("has an invalid port") from None
        return normalise_base_url(value)


def normalise_base_url(url: str) -> str:
    """One spelling per server (scheme and host in lower case, no default port, no trailing
    ``/``): the base URL is part of every request's fingerprint, and ``HTTP://Host/v1/`` must
    not send again what ``http://host/v1`` answered. An already-normal URL is returned as it
    is, so the fingerprints of existing checkpoints do not change."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    userinfo, at, _ = parts.netloc.rpartition("@")
    host = parts.hostname or ""
    netloc = f"{userinfo}{at}{f'[{host}]' if ':' in host else host}"
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(scheme):
        netloc += f":{parts.port}"
    rest = url[len(parts.scheme) + 3 + len(parts.netloc) :]  # path, query and fragment as given
    path, mark, tail = rest.partition("?") if "?" in rest else rest.partition("#")
    return f"{scheme}://{netloc}{path.rstrip('/')}{mark}{tail}"


class RequestConfig(_Section):
    model: str | list[str]  # a list asks every model for every row
    prompt: str
    system: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    n_mode: Literal["native", "fanout"] = "native"
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    reasoning_effort: Literal["none", "low", "medium", "high"] | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    images: list[str] = Field(default_factory=list)
    extra_body: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _distinct_models(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("takes a model name or a list of distinct model names")
        if any(not name.strip() for name in ([value] if isinstance(value, str) else value)):
            raise ValueError("a model name cannot be empty")
        return value

    @property
    def models(self) -> list[str]:
        """The models asked, in order: one, or the list."""
        return list(self.model) if isinstance(self.model, list) else [self.model]

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not 1 <= len(value) <= 4:
            raise ValueError(f"takes 1 to 4 stop strings, got {len(value)}")
        return value


class LimitsConfig(_Section):
    concurrency: Literal["auto"] | int = "auto"
    max_concurrency: int = Field(default=512, ge=1, le=10_000)
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    adaptive: bool = True
    stall_timeout_s: float = Field(default=900, gt=0)
    max_cost_usd: float | None = Field(default=None, ge=0)
    # The run's first rows as a test of the job: these many all failing the same way stop it.
    early_stop_rows: int = Field(default=20, ge=0)

    @field_validator("concurrency", mode="wrap")
    @classmethod
    def _auto_or_count(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            found = handler(value)
        except ValidationError:
            found = None
        if found is None or (isinstance(found, int) and not 1 <= found <= 10_000):
            raise ValueError("takes auto or a whole number from 1 to 10,000")
        return found

    @property
    def connections(self) -> int:
        """Requests in flight at most: the number, or ``max_concurrency`` with auto."""
        return self.max_concurrency if self.concurrency == "auto" else self.concurrency


class RetryConfig(_Section):
    max_attempts: int = Field(default=6, ge=1)
    initial_backoff_s: float = Field(default=1, ge=0)
    max_backoff_s: float = Field(default=60, ge=0)
    deadline_s: float | None = Field(default=None, gt=0)
    invalid_output_attempts: int = Field(default=2, ge=0)

    @model_validator(mode="after")
    def _backoff_order(self) -> RetryConfig:
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"max_backoff_s ({self.max_backoff_s:g}) is below "
                f"initial_backoff_s ({self.initial_backoff_s:g})"
            )
        return self


class OutputConfig(_Section):
    path: str | None = None
    keep_columns: list[str] | None = None
    checkpoint_dir: str | None = None
    parse: Literal["none", "tool_arguments", "json"] = "none"
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    # Finish reasons that make an answered row a failed one (e.g. length, content_filter).
    fail_on_finish: list[str] = Field(default_factory=list)

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    @field_validator("path")
    @classmethod
    def _parquet_path(cls, value: str | None) -> str | None:
        if value is not None and not value.lower().endswith(".parquet"):
            raise ValueError("must end in .parquet (the output is a Parquet file)")
        return value


class BatchConfig(_Section):
    """The provider Batch API (``endpoint.mode: batch``): how rows are split and watched."""

    max_lines: int = Field(default=50_000, ge=1, le=50_000)
    max_bytes: int = Field(default=190_000_000, ge=1024)
    completion_window: str = "24h"
    poll_s: float = Field(default=30, ge=0.05)


class ImagesConfig(_Section):
    max_edge_px: int | None = Field(default=1568, ge=16)
    max_bytes: int = Field(default=5_000_000, ge=1024)
    allow_outside_root: bool = False


class PriceConfig(_Section):
    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_read: float | None = Field(default=None, ge=0)
    batch_input: float | None = Field(default=None, ge=0)  # default: half of input
    batch_output: float | None = Field(default=None, ge=0)  # default: half of output
    # The most output tokens one choice may take, reserved when request.max_tokens is unset.
    max_output_tokens: int | None = Field(default=None, ge=1)


class RayConfig(_Section):
    """``batcher run --ray``: the cluster to join and how the input is cut into shards."""

    address: str | None = None  # None: RAY_ADDRESS, else a local cluster for the run
    workers: int | None = Field(default=None, ge=1, le=10_000)  # None: the cluster's CPUs
    shard_rows: int = Field(default=50_000, ge=1)


class JobConfig(_Section):
    name: str = Field(max_length=200)
    input: InputConfig
    request: RequestConfig
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    prices: dict[str, PriceConfig] = Field(default_factory=dict)
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("name")
    @classmethod
    def _file_name(cls, value: str) -> str:
        if not _SAFE_NAME.fullmatch(value):
            raise ValueError(
                "must be a plain file name: no '/' or '\\', not starting with '.', not empty"
            )
        return value


class Job:
    """A validated job file with its paths resolved against the job file's folder."""

    __slots__ = ("checkpoint_dir", "config", "image_root", "input_path", "output_path", "source")

    def __init__(self, config: JobConfig, source: Path) -> None:
        base = source.parent
        self.config = config
        self.source = source
        self.input_path = str(_resolve(base, config.input.path))
        output = config.output.path or f"out/{config.name}.parquet"
        self.output_path = _resolve(base, output)
        self.image_root = (
            _resolve(base, config.input.image_root)
            if config.input.image_root
            else Path(self.input_path).parent
        )
        self.checkpoint_dir = (
            _resolve(base, config.output.checkpoint_dir)
            if config.output.checkpoint_dir
            else self.output_path.with_name(self.output_path.name + ".checkpoint")
        )


def _resolve(base: Path, path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else (base / candidate).resolve()


def load_job(path: str | Path, overrides: list[str] | None = None) -> Job:
    """Read, substitute, override and validate a job file; every mistake is a ConfigError."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: job file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{source}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read job file: {exc.strerror}") from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {describe_yaml_error(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    raw = _substitute_env(raw, source, ())
    for override in overrides or []:
        _apply_override(raw, override, source)
    try:
        config = JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None
    return Job(config, source.resolve())


class _JobLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping instead of keeping the last."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Hashable] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, Hashable):
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
    return loader.construct_mapping(node, deep=True)


_JobLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(text: str) -> Any:
    """YAML with duplicate keys refused (PyYAML silently keeps the last one)."""
    return yaml.load(text, Loader=_JobLoader)  # a SafeLoader subclass: safe


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """``line L, column C: problem`` on one line (PyYAML's own text spans five to eight)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        if mark is not None:
            return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
        return problem
    return " ".join(str(exc).split())


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: ``dotted.key: what is wrong``."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key")
        elif error["type"] == "missing":
            lines.append(f"{where}: required key is missing")
        else:
            message = error["msg"].removeprefix("Value error, ")
            given = error.get("input")
            # A whole section as "got" would be a wall of text; its message names the keys.
            got = "" if isinstance(given, dict) else f" (got {given!r})"
            lines.append(f"{where}: {message}{got}")
    return "; ".join(lines)


def _substitute_env(value: Any, source: Path, where: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        if ".".join(where[:2]) not in ENV_KEYS:
            return value  # left as written: see ENV_KEYS

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                key = ".".join(where) or "(top level)"
                raise ConfigError(f"{source}: {key}: environment variable {name} is not set")
            return os.environ[name]

        return _ENV_REFERENCE.sub(replace, value)
    if isinstance(value, dict):
        return {k: _substitute_env(v, source, (*where, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_env(v, source, (*where, str(i))) for i, v in enumerate(value)]
    return value


def _apply_override(raw: dict[str, Any], override: str, source: Path) -> None:
    dotted, sep, text = override.partition("=")
    if not sep or not dotted:
        raise ConfigError(f"--set {override!r}: expected dotted.key=value")
    try:
        value = load_yaml(text) if text else ""
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"--set {dotted}: value is not valid YAML: {describe_yaml_error(exc)}"
        ) from None
    parts = dotted.split(".")
    # Substituted like the file's own values, so --set behaves as if written there.
    value = _substitute_env(value, source, tuple(parts))
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"--set {dotted}: {source}: {where} is not a mapping")
        node = child
    node[parts[-1]] = value
