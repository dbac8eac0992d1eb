"""Values for a JSON Schema: what the simulator answers a request that asks for structured
output (``response_format`` of type ``json_schema``, or a forced tool's parameters).

``value_for`` is a small deterministic generator: the same schema and seed give the same value,
and it covers what structured-output schemas use (object with properties and required, string
with enum, const and lengths, integer and number with bounds, boolean, null, array with items
and lengths, type lists, anyOf/oneOf/allOf, local ``$ref``). What it cannot satisfy (a pattern,
a format) gets a plain best effort. ``violation_for`` breaks a schema on purpose, for tests of
what a client does with a reply that does not fit.
"""

from __future__ import annotations

import math
from typing import Any

_DEPTH = 8  # nesting followed at most: a recursive $ref ends in a plain value
_DEFAULT_SPAN = 100


def value_for(schema: Any, seed: int, root: Any = None, depth: int = 0) -> Any:
    """A value valid against ``schema`` (best effort), chosen by ``seed``."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > _DEPTH:
        return f"text-{seed % 1000}"
    if "$ref" in schema:
        return value_for(_resolve(root, schema["$ref"]), seed, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][seed % len(schema["enum"])]
    for combined in ("anyOf", "oneOf"):
        branches = schema.get(combined)
        if isinstance(branches, list) and branches:
            # The first branch that is not null: oneOf's branches rarely overlap in practice.
            chosen = next((b for b in branches if _kind(b) != "null"), branches[0])
            return value_for(chosen, seed, root, depth + 1)
    if isinstance(schema.get("allOf"), list):
        return value_for(_merged(schema), seed, root, depth + 1)
    kind = _kind(schema)
    if kind == "object":
        return _object(schema, seed, root, depth)
    if kind == "array":
        return _array(schema, seed, root, depth)
    if kind == "integer":
        low, high = _bounds(schema, integer=True)
        return int(low + seed % (int(high - low) + 1))
    if kind == "number":
        low, high = _bounds(schema, integer=False)
        return round(low + (seed % 1000) / 1000 * (high - low), 6)
    if kind == "boolean":
        return bool(seed % 2)
    if kind == "null":
        return None
    return _string(schema, seed)


def violation_for(schema: Any, seed: int) -> Any:
    """A value ``schema`` refuses (best effort): an object without one of its required
    properties, else a value of another type."""
    if isinstance(schema, dict) and _kind(schema) == "object":
        value = value_for(schema, seed)
        required = [name for name in schema.get("required") or [] if name in value]
        if required:
            del value[required[seed % len(required)]]
            return value
        properties = schema.get("properties") or {}
        if properties:
            name = next(iter(properties))
            value[name] = _other_type(properties[name])
            return value
        return [value]
    return _other_type(schema)


def _kind(schema: Any) -> str | None:
    """The schema's type; of a list of types, the first that is not null."""
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if kinds else "null"
    if kind is None:
        if "properties" in schema:
            return "object"
        if "items" in schema:
            return "array"
    return kind if isinstance(kind, str) else None


def _object(schema: dict[str, Any], seed: int, root: Any, depth: int) -> dict[str, Any]:
    properties = schema.get("properties")
    value: dict[str, Any] = {}
    if isinstance(properties, dict):
        for index, (name, sub) in enumerate(properties.items()):
            value[name] = value_for(sub, _mix(seed, index), root, depth + 1)
    for name in schema.get("required") or []:
        if isinstance(name, str) and name not in value:
            value[name] = f"text-{seed % 1000}"  # required but never described: any value
    return value


def _array(schema: dict[str, Any], seed: int, root: Any, depth: int) -> list[Any]:
    low = int(schema.get("minItems") or 0)
    high = schema.get("maxItems")
    count = max(low, 1)
    if isinstance(high, int):
        count = min(count, high)
    items = schema.get("items")
    values = [value_for(items, _mix(seed, i), root, depth + 1) for i in range(count)]
    if schema.get("uniqueItems") and len({repr(v) for v in values}) < len(values):
        values = values[:1]  # best effort: one value is always unique
    return values


# Strings of the formats structured outputs name (jsonschema checks none of them by default).
_FORMATS = {
    "date": "2024-01-31",
    "date-time": "2024-01-31T12:00:00Z",
    "time": "12:00:00Z",
    "email": "someone@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def _string(schema: dict[str, Any], seed: int) -> str:
    text = _FORMATS.get(str(schema.get("format")), f"text-{seed % 1000}")
    low = int(schema.get("minLength") or 0)
    high = schema.get("maxLength")
    if len(text) < low:
        text += "x" * (low - len(text))
    if isinstance(high, int):
        text = text[:high]
    return text


def _bounds(schema: dict[str, Any], *, integer: bool) -> tuple[float, float]:
    """The closed range a number may take, exclusive bounds moved inside."""
    step = 1 if integer else 1e-3
    low = _number(schema.get("minimum"))
    high = _number(schema.get("maximum"))
    above = _number(schema.get("exclusiveMinimum"))
    below = _number(schema.get("exclusiveMaximum"))
    if above is not None:
        low = above + step if low is None else max(low, above + step)
    if below is not None:
        high = below - step if high is None else min(high, below - step)
    span = _DEFAULT_SPAN if integer else 1
    if low is None:
        low = 0.0 if high is None else high - span
    if high is None:
        high = low + span
    if integer:
        low, high = float(math.ceil(low)), float(math.floor(high))  # the whole numbers inside
    return low, max(high, low)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _merged(schema: dict[str, Any]) -> dict[str, Any]:
    """allOf's parts as one schema: properties and required lists joined, the rest overlaid."""
    merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
    for part in schema["allOf"]:
        if not isinstance(part, dict):
            continue
        for key, value in part.items():
            if key == "properties" and isinstance(value, dict):
                merged["properties"] = {**merged.get("properties", {}), **value}
            elif key == "required" and isinstance(value, list):
                merged["required"] = [*merged.get("required", []), *value]
            else:
                merged.setdefault(key, value)
    return merged


def _resolve(root: Any, reference: Any) -> Any:
    """A local reference (``#/$defs/name``); anything else resolves to no constraint."""
    if not isinstance(reference, str) or not reference.startswith("#"):
        return {}
    node = root
    for escaped in reference.lstrip("#").strip("/").split("/"):
        if not escaped:
            continue
        part = escaped.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return {}
        node = node[part]
    return node


def _other_type(schema: Any) -> Any:
    """A value whose type ``schema`` does not take."""
    if not isinstance(schema, dict):
        return 12345
    kinds = schema.get("type")
    kinds = set(kinds) if isinstance(kinds, list) else {kinds}
    if "string" in kinds or "enum" in schema or "const" in schema:
        return 12345
    return "not the type the schema asks for"


def _mix(seed: int, index: int) -> int:
    """A seed for the ``index``-th part, so sibling values differ."""
    return (seed * 6364136223846793005 + 1442695040888963407 * (index + 1)) % 2**61
