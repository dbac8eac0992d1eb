"""The simulator honours the request's schema: its structured replies validate (Hypothesis over
schemas), ``schema_violation_share`` breaks them on purpose, and a ``parse: json`` job runs
offline to typed columns."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from batcher.cli import main
from batcher.sim import SimSettings, Simulator
from batcher.sim.schema import value_for, violation_for
from tests.conftest import SimFactory, reviews, write_job
from tests.test_first_rows import JSON_OUTPUT, RESPONSE_FORMAT, SCHEMA

NAMES = st.text("abcdefgh_", min_size=1, max_size=6)


@st.composite
def strings(draw: st.DrawFn) -> dict[str, Any]:
    low = draw(st.integers(0, 12))
    schema: dict[str, Any] = {"type": "string", "minLength": low}
    if draw(st.booleans()):
        schema["maxLength"] = draw(st.integers(low, low + 20))
    return schema


@st.composite
def numbers(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["integer", "number"]))
    schema: dict[str, Any] = {"type": kind}
    low = draw(st.integers(-1000, 1000))
    if draw(st.booleans()):
        schema["minimum"] = low
    if draw(st.booleans()):
        schema["maximum"] = low + draw(st.integers(0, 50))
    if kind == "number" and draw(st.booleans()):
        schema["exclusiveMinimum"] = low - 0.5
    return schema


SCALARS = st.one_of(
    strings(),
    numbers(),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(NAMES, min_size=1, max_size=4, unique=True).map(lambda e: {"enum": e}),
    st.lists(NAMES, min_size=1, max_size=4, unique=True).map(
        lambda e: {"type": "string", "enum": e}
    ),
    st.sampled_from(["date", "date-time", "email"]).map(lambda f: {"type": "string", "format": f}),
)


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    return {**schema, "type": [kind, "null"]} if kind not in (None, "null") else schema


@st.composite
def objects(draw: st.DrawFn, children: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    properties = draw(st.dictionaries(NAMES, children, min_size=1, max_size=5))
    required = draw(st.lists(st.sampled_from(sorted(properties)), unique=True))
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


@st.composite
def arrays(draw: st.DrawFn, children: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    low = draw(st.integers(0, 3))
    schema: dict[str, Any] = {"type": "array", "items": draw(children), "minItems": low}
    if draw(st.booleans()):
        schema["maxItems"] = draw(st.integers(max(low, 1), 5))
    return schema


SCHEMAS = st.recursive(
    st.one_of(SCALARS, SCALARS.map(nullable)),
    lambda children: st.one_of(
        objects(children),
        arrays(children),
        st.lists(children, min_size=1, max_size=3).map(lambda b: {"anyOf": b}),
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(schema=SCHEMAS, seed=st.integers(0, 2**64))
def test_the_value_for_a_schema_validates(schema: dict[str, Any], seed: int) -> None:
    jsonschema.validate(value_for(schema, seed), schema)


@settings(max_examples=200, deadline=None)
@given(schema=objects(SCHEMAS), seed=st.integers(0, 2**64))
def test_the_violation_of_an_object_schema_does_not_validate(
    schema: dict[str, Any], seed: int
) -> None:
    if not schema["required"]:
        # Without a required property, the first one gets a value of another type.
        first = next(iter(schema["properties"].values()))
        if first.get("type") == "null" or "anyOf" in first:
            return  # another type than null may be one anyOf allows: no violation promised
    validator = jsonschema.Draft202012Validator(schema)
    assert not validator.is_valid(violation_for(schema, seed))


def test_local_references_and_all_of_are_followed() -> None:
    schema = {
        "$defs": {"label": {"type": "string", "enum": ["a", "b"]}},
        "allOf": [
            {"type": "object", "properties": {"label": {"$ref": "#/$defs/label"}}},
            {"properties": {"n": {"type": "integer", "minimum": 3, "maximum": 3}}},
        ],
        "required": ["label", "n"],
    }
    for seed in range(20):
        value = value_for(schema, seed)
        jsonschema.validate(value, schema)
        assert value["n"] == 3


def _reply(body: dict[str, Any], violation_share: float = 0.0) -> dict[str, Any]:
    simulator = Simulator(SimSettings(schema_violation_share=violation_share))
    return simulator.build_reply(body, "Review 1: fine", 10)


def test_replies_meet_the_response_format_and_the_forced_tools_schema() -> None:
    messages = [{"role": "user", "content": "Review 1: fine"}]
    body = {"model": "m", "messages": messages, **RESPONSE_FORMAT["extra_body"]}
    content = _reply(body)["choices"][0]["message"]["content"]
    jsonschema.validate(orjson.loads(content), SCHEMA)
    broken = _reply(body, violation_share=1.0)["choices"][0]["message"]["content"]
    assert not jsonschema.Draft202012Validator(SCHEMA).is_valid(orjson.loads(broken))
    tool = {"type": "function", "function": {"name": "label", "parameters": SCHEMA}}
    forced = {"type": "function", "function": {"name": "label"}}
    body = {"model": "m", "messages": messages, "tools": [tool], "tool_choice": forced}
    call = _reply(body)["choices"][0]["message"]["tool_calls"][0]
    jsonschema.validate(orjson.loads(call["function"]["arguments"]), SCHEMA)
    call = _reply(body, violation_share=1.0)["choices"][0]["message"]["tool_calls"][0]
    assert not jsonschema.Draft202012Validator(SCHEMA).is_valid(
        orjson.loads(call["function"]["arguments"])
    )


def test_a_json_job_runs_offline_to_typed_columns(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory()
    job = write_job(
        tmp_path, server.url, data=reviews(50), request=RESPONSE_FORMAT, output=JSON_OUTPUT
    )
    assert main(["run", str(job), "--quiet"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.height == 50
    assert out.schema["label"] == pl.String
    assert out.schema["score"] == pl.Int64
    assert set(out["label"]) <= {"positive", "negative"}
    assert out["score"].is_between(1, 5).all()
    assert server.simulator.requests == 50


def test_a_share_of_replies_that_break_the_schema_is_retried(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    server = sim_factory(schema_violation_share=0.5)
    job = write_job(
        tmp_path, server.url, data=reviews(50), request=RESPONSE_FORMAT, output=JSON_OUTPUT
    )
    assert main(["run", str(job), "--quiet"]) in (0, 1)
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert server.simulator.requests > 60  # about half the replies broke it: retried
    assert out["attempts"].max() > 1  # type: ignore[operator]
    ok = out.filter(pl.col("error").is_null())
    assert ok.height > 40
    assert ok["label"].is_in(["positive", "negative"]).all()
    failed = out.filter(pl.col("error").is_not_null())["error"]
    assert failed.str.starts_with("invalid_output").all()


def test_the_sample_json_job_runs_offline(tmp_path: Path) -> None:
    # As the README says: `batcher run configs/label_reviews_json.yaml --simulate`.
    root = Path(__file__).parent.parent
    for folder in ("configs", "sample_data"):
        shutil.copytree(root / folder, tmp_path / folder)
    job = tmp_path / "configs" / "label_reviews_json.yaml"
    assert main(["run", str(job), "--simulate", "--quiet"]) == 0
    out = pl.read_parquet(tmp_path / "out" / "label_reviews_json.parquet")
    assert out.schema["stars_guess"] == pl.Int64
    assert out["sentiment"].is_in(["positive", "negative", "neutral"]).all()
    assert out["error"].null_count() == out.height
