"""Structured output: tool-call arguments or JSON replies, validated and typed as columns."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import polars as pl

from batcher.config import Job, JobConfig
from batcher.errors import ConfigError
from batcher.send.attempt import AttemptError
from batcher.send.checks import SchemaChecks, validate

_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


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

    def __init__(self, config: JobConfig, *, check_time_s: float | None = None) -> None:
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
        self.checks = SchemaChecks(self.schema, check_time_s=check_time_s)
        properties = self.schema.get("properties") if self.mode != "none" else None
        self.columns: dict[str, pl.DataType] = (
            {name: dtype_of(sub) for name, sub in properties.items()}
            if isinstance(properties, dict)
            else {}
        )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def parse(self, message: dict[str, Any]) -> dict[str, Any]:
        """The validated object from a reply's first message; AttemptError if it is not one.
        Blocking, for as long as the schema takes: the run calls ``aparse``."""
        return _fitted(*validate(self.checks.validator, self._text_of(message)))

    async def aparse(self, message: dict[str, Any]) -> dict[str, Any]:
        """``parse`` off the event loop, within the checks' time (see ``SchemaChecks``)."""
        return _fitted(*await self.checks.check(self._text_of(message)))

    def _text_of(self, message: dict[str, Any]) -> str:
        if self.mode == "tool_arguments":
            calls = message.get("tool_calls") or []
            chosen = [
                c
                for c in calls
                if self.tool_name is None or (c.get("function") or {}).get("name") == self.tool_name
            ]
            if not chosen:
                raise _invalid("the reply has no call of tool " + repr(self.tool_name))
            return str((chosen[0].get("function") or {}).get("arguments") or "")
        text = str(message.get("content") or "")
        fenced = _FENCE.match(text)
        return fenced.group(1) if fenced else text


def _fitted(value: Any, why: str | None) -> dict[str, Any]:
    if why is not None:
        raise _invalid(why)
    return dict(value)


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
