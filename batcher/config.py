"""The job file: pydantic models of every key, YAML loading, ``${VAR}`` and ``--set`` overrides.

pydantic lives only here, at the boundary; the models are frozen so the rest of the pipeline
reads them without copying.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from batcher.errors import ConfigError

DEFAULT_BASE_URL = "https://gateway.theturbo.ai/v1"
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputConfig(_Section):
    path: str
    id_column: str | None = None
    image_root: str | None = None


class EndpointConfig(_Section):
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "BATCHER_API_KEY"
    timeout_s: float = Field(default=120, gt=0)
    stream_idle_timeout_s: float = Field(default=30, gt=0)
    transport: Literal["aiohttp", "httpx"] = "aiohttp"
    mode: Literal["live", "batch"] = "live"


class RequestConfig(_Section):
    model: str
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

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not 1 <= len(value) <= 4:
            raise ValueError(f"takes 1 to 4 stop strings, got {len(value)}")
        return value


class LimitsConfig(_Section):
    concurrency: int = Field(default=32, ge=1, le=10_000)
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    adaptive: bool = True
    max_cost_usd: float | None = Field(default=None, ge=0)


class RetryConfig(_Section):
    max_attempts: int = Field(default=6, ge=1)
    initial_backoff_s: float = Field(default=1, ge=0)
    max_backoff_s: float = Field(default=60, ge=0)
    deadline_s: float | None = Field(default=None, gt=0)
    invalid_output_attempts: int = Field(default=2, ge=0)


class OutputConfig(_Section):
    path: str | None = None
    keep_columns: list[str] | None = None
    checkpoint_dir: str | None = None
    parse: Literal["none", "tool_arguments", "json"] = "none"
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class BatchConfig(_Section):
    """The provider Batch API (``endpoint.mode: batch``): how rows are split and watched."""

    max_lines: int = Field(default=50_000, ge=1, le=50_000)
    max_bytes: int = Field(default=190_000_000, ge=1024)
    completion_window: str = "24h"
    poll_s: float = Field(default=30, ge=0.05)


class ImagesConfig(_Section):
    max_edge_px: int | None = Field(default=1568, ge=16)
    max_bytes: int = Field(default=5_000_000, ge=1024)


class PriceConfig(_Section):
    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_read: float | None = Field(default=None, ge=0)
    batch_input: float | None = Field(default=None, ge=0)  # default: half of input
    batch_output: float | None = Field(default=None, ge=0)  # default: half of output


class JobConfig(_Section):
    name: str
    input: InputConfig
    request: RequestConfig
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    prices: dict[str, PriceConfig] = Field(default_factory=dict)


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
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read job file: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
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
            lines.append(f"{where}: {message} (got {error.get('input')!r})")
    return "; ".join(lines)


def _substitute_env(value: Any, source: Path, where: tuple[str, ...]) -> Any:
    if isinstance(value, str):

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
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {dotted}: value is not valid YAML: {exc}") from None
    parts = dotted.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"--set {dotted}: {source}: {where} is not a mapping")
        node = child
    node[parts[-1]] = value
