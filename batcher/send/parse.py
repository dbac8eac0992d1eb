"""Structured output: tool-call arguments or JSON replies, validated and typed as columns."""

from __future__ import annotations

import os
import re
import threading
from typing import Any

import anyio
import jsonschema
import orjson
import polars as pl

from batcher.config import Job, JobConfig
from batcher.errors import ConfigError
from batcher.send.attempt import AttemptError

_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)
# A real reply is checked in milliseconds; a check past this is a `pattern` backtracking
# (`^(a+)+$` against "aaaa…ab" took 22 s) or a quadratic `uniqueItems`, and fails its attempt.
CHECK_TIME_S = 5.0
# A thread cannot be stopped: a check past its time runs on to its end. At most this many may;
# beyond, checks fail at once instead of piling up threads that each hold a core.
STUCK_CHECKS = 4


def dtype_of(schema: dict[str, Any]) -> pl.DataType:
    """The polars type a JSON Schema property becomes; anything vague stays JSON text."""
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if "enum" in schema and kind is None:
        values = schema["enum"]
        if values and all(isinstance(v, str) for v in values):
            kind = "string"
    if kind == "string":
        return pl.String()
    if kind == "number":
        return pl.Float64()
    if kind == "integer":
        return pl.Int64()
    if kind == "boolean":
        return pl.Boolean()
    if kind == "array" and isinstance(schema.get("items"), dict):
        return pl.List(dtype_of(schema["items"]))
    if kind == "object" and isinstance(schema.get("properties"), dict):
        return pl.Struct({name: dtype_of(sub) for name, sub in schema["properties"].items()})
    return pl.String()


class OutputParser:
    """Checks a reply against the job's schema and yields its top-level properties."""

    def __init__(
        self,
        config: JobConfig,
        *,
        check_time_s: float = CHECK_TIME_S,
        stuck_checks: int = STUCK_CHECKS,
    ) -> None:
        self.check_time_s = check_time_s
        self.stuck_checks = stuck_checks
        self._checks: anyio.CapacityLimiter | None = None  # made on the run's loop
        self._stuck = 0  # checks past their time, still running in their thread
        self._stuck_lock = threading.Lock()
        self.mode = config.output.parse
        self.schema: dict[str, Any] = {}
        self.tool_name: str | None = None
        if self.mode == "tool_arguments":
            self.tool_name, self.schema = _tool_schema(config)
        elif self.mode == "json":
            if config.output.json_schema is None:
                raise ConfigError("output.schema: required with output.parse: json")
            if not config.output.json_schema:
                # {} accepts any reply and yields no columns: always a mistake with parse: json.
                raise ConfigError(
                    "output.schema: is empty; give the JSON Schema of the reply "
                    "(type: object with properties)"
                )
            self.schema = config.output.json_schema
        if self.schema:
            try:
                jsonschema.validators.validator_for(self.schema).check_schema(self.schema)
            except jsonschema.SchemaError as exc:
                raise ConfigError(
                    f"output schema is not a valid JSON Schema: {exc.message}"
                ) from None
            self._validator: Any = jsonschema.validators.validator_for(self.schema)(self.schema)
        properties = self.schema.get("properties") if self.mode != "none" else None
        self.columns: dict[str, pl.DataType] = (
            {name: dtype_of(sub) for name, sub in properties.items()}
            if isinstance(properties, dict)
            else {}
        )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    async def aparse(self, message: dict[str, Any]) -> dict[str, Any]:
        """``parse``, off the event loop (a schema check can take any time) and bounded by
        ``check_time_s``; AttemptError ``invalid_output`` past it."""
        if self._stuck >= self.stuck_checks:
            raise _invalid(
                f"not checked: {self._stuck} schema checks still run past {self.check_time_s:g} s"
            )
        if self._checks is None:
            self._checks = anyio.CapacityLimiter(os.cpu_count() or 2)
        check = _Check()
        try:
            with anyio.move_on_after(self.check_time_s):
                return await anyio.to_thread.run_sync(
                    self._parse_in_thread, message, check, limiter=self._checks,
                    abandon_on_cancel=True,
                )  # fmt: skip
        finally:
            with self._stuck_lock:
                if not check.done:
                    check.abandoned = True
                    self._stuck += check.started
        raise _invalid(f"the schema check took over {self.check_time_s:g} s")

    def _parse_in_thread(self, message: dict[str, Any], check: _Check) -> dict[str, Any]:
        with self._stuck_lock:
            if check.abandoned:
                return {}  # its attempt gave up before the check began: nobody reads this
            check.started = True
        try:
            return self.parse(message)
        finally:
            with self._stuck_lock:
                check.done = True
                if check.abandoned:
                    self._stuck -= 1

    def parse(self, message: dict[str, Any]) -> dict[str, Any]:
        """The validated object from a reply's first message; AttemptError if it is not one.
        Blocking, for as long as the schema takes: the run calls ``aparse``."""
        if self.mode == "tool_arguments":
            calls = message.get("tool_calls") or []
            chosen = [
                c
                for c in calls
                if self.tool_name is None or (c.get("function") or {}).get("name") == self.tool_name
            ]
            if not chosen:
                raise _invalid("the reply has no call of tool " + repr(self.tool_name))
            text = str((chosen[0].get("function") or {}).get("arguments") or "")
        else:
            text = str(message.get("content") or "")
            fenced = _FENCE.match(text)
            if fenced:
                text = fenced.group(1)
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise _invalid(f"not JSON ({exc})") from None
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(value))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise _invalid(f"{where}: {error.message}")
        if not isinstance(value, dict):
            raise _invalid("the value is not a JSON object")
        return value


class _Check:
    """One schema check's state, shared with its thread under the parser's lock."""

    __slots__ = ("abandoned", "done", "started")

    def __init__(self) -> None:
        self.started = False
        self.done = False
        self.abandoned = False


def _invalid(why: str) -> AttemptError:
    return AttemptError("invalid_output", why, retryable=True)


def _tool_schema(config: JobConfig) -> tuple[str | None, dict[str, Any]]:
    tools = config.request.tools or []
    if not tools:
        raise ConfigError("output.parse: tool_arguments needs request.tools")
    choice = config.request.tool_choice
    name = None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
    elif len(tools) == 1:
        name = (tools[0].get("function") or {}).get("name")
    for tool in tools:
        function = tool.get("function") or {}
        if name is None or function.get("name") == name:
            parameters = function.get("parameters")
            if not isinstance(parameters, dict):
                raise ConfigError(
                    f"request.tools: tool {function.get('name')!r} has no parameters schema"
                )
            return function.get("name"), parameters
    raise ConfigError(f"request.tool_choice names tool {name!r}, which request.tools lacks")


def parser_for(job: Job) -> OutputParser:
    """The job's output parser; its configuration errors name the job file."""
    try:
        return OutputParser(job.config)
    except ConfigError as exc:
        raise ConfigError(f"{job.source}: {exc}") from None
