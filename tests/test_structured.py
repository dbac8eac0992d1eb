"""Function calling into typed columns, JSON replies, n, stop, reasoning and streaming."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batcher.cli import main
from tests.conftest import SimFactory, reviews, write_job

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "label_review",
            "description": "Label the sentiment of a review.",
            "parameters": {
                "type": "object",
                "properties": {
                    "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                    "confidence": {"type": "number"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "flagged": {"type": "boolean"},
                    "score": {"type": "integer"},
                    "detail": {"type": "object", "properties": {"aspect": {"type": "string"}}},
                },
                "required": ["sentiment"],
            },
        },
    }
]
TOOL_REQUEST = {
    "tools": TOOLS,
    "tool_choice": {"type": "function", "function": {"name": "label_review"}},
}


def test_tool_arguments_become_typed_columns(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url, request=TOOL_REQUEST, output={"parse": "tool_arguments"})
    assert main(["run", str(job), "--quiet"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.schema["sentiment"] == pl.String
    assert out.schema["confidence"] == pl.Float64
    assert out.schema["tags"] == pl.List(pl.String)
    assert out.schema["flagged"] == pl.Boolean
    assert out.schema["score"] == pl.Int64
    assert out.schema["detail"] == pl.Struct({"aspect": pl.String})
    assert set(out["sentiment"]) <= {"positive", "negative", "neutral"}
    assert out["confidence"].null_count() == 0
    assert out["finish_reason"].unique().to_list() == ["tool_calls"]
    assert out["tool_calls"].str.contains("label_review").all()


def test_invalid_tool_output_is_retried_then_fails(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory()
    data = reviews(10).with_columns(
        pl.when(pl.col("stars") == 1)
        .then("[[sim:invalid]] " + pl.col("text"))
        .otherwise(pl.col("text"))
        .alias("text")
    )
    job = write_job(
        tmp_path,
        server.url,
        data=data,
        request=TOOL_REQUEST,
        output={"parse": "tool_arguments"},
        retry={"invalid_output_attempts": 2},
    )
    assert main(["run", str(job), "--quiet"]) == 1
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    bad = out.filter(pl.col("error").is_not_null())
    assert bad.height == data.filter(pl.col("stars") == 1).height
    assert bad["error"].str.starts_with("invalid_output: ").all()
    assert bad["attempts"].unique().to_list() == [3]
    assert bad["response"].str.contains("unexpected").all()  # the raw reply is kept
    assert bad["sentiment"].null_count() == bad.height


def test_json_replies_validated_against_output_schema(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    server = sim_factory()
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}, "length": {"type": "integer"}},
        "required": ["answer", "length"],
    }
    job = write_job(
        tmp_path,
        server.url,
        request={"prompt": "Reply in JSON about: {{ text }}"},
        output={"parse": "json", "schema": schema},
    )
    assert main(["run", str(job), "--quiet"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.schema["length"] == pl.Int64
    assert out["answer"].null_count() == 0


def test_property_clashing_with_a_column_is_a_configuration_error(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    tools = [
        {
            "type": "function",
            "function": {
                "name": "t",
                "parameters": {"type": "object", "properties": {"title": {"type": "string"}}},
            },
        }
    ]
    job = write_job(
        tmp_path, server.url, request={"tools": tools}, output={"parse": "tool_arguments"}
    )
    assert main(["run", str(job), "--quiet"]) == 2
    assert "clash" in capsys.readouterr().err
    assert server.simulator.requests == 0


def test_n_choices_native_and_fanout(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url, request={"n": 3, "temperature": 1})
    assert main(["run", str(job), "--quiet"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["responses"].list.len().unique().to_list() == [3]
    assert (out["responses"].list.first() == out["response"]).all()
    assert server.simulator.requests == 20

    fan = write_job(
        tmp_path,
        server.url,
        name="fan.yaml",
        request={"n": 3, "n_mode": "fanout"},
        output={"path": "out/fan.parquet"},
    )
    assert main(["run", str(fan), "--quiet"]) == 0
    out = pl.read_parquet(tmp_path / "out/fan.parquet")
    assert out["responses"].list.len().unique().to_list() == [3]
    assert server.simulator.requests == 20 + 60
    single = pl.read_parquet(tmp_path / "out/result.parquet")
    assert (out["prompt_tokens"] == 3 * single["prompt_tokens"]).all()


def test_fewer_choices_than_asked_is_a_warning(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    data = reviews(5).with_columns(("[[sim:n1]] " + pl.col("text")).alias("text"))
    job = write_job(tmp_path, server.url, data=data, request={"n": 2})
    assert main(["run", str(job), "--quiet"]) == 0
    assert "asked for n=2 choices, a reply carried fewer (5×)" in capsys.readouterr().err


def test_stop_truncates(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url, request={"stop": [" to:"]})
    assert main(["run", str(job), "--quiet"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert not out["response"].str.contains(" to:").any()
    assert out["response"].str.starts_with("Simulated reply").all()


def test_reasoning_goes_to_its_column_and_unsupported_model_warns(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url, request={"reasoning_effort": "low"})
    assert main(["run", str(job), "--quiet"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["reasoning"].unique().to_list() == ["Simulated low reasoning."]
    assert "not listed as supporting reasoning_effort" in capsys.readouterr().err


@pytest.mark.parametrize("request_fields", [{}, TOOL_REQUEST, {"n": 2}])
def test_streaming_equals_non_streaming(
    tmp_path: Path, sim_factory: SimFactory, request_fields: dict[str, Any]
) -> None:
    server = sim_factory()
    parse = {"parse": "tool_arguments"} if "tools" in request_fields else {}
    plain = write_job(
        tmp_path, server.url, request=request_fields, output={"path": "out/plain.parquet", **parse}
    )
    streamed = write_job(
        tmp_path,
        server.url,
        name="stream.yaml",
        request={**request_fields, "stream": True},
        output={"path": "out/stream.parquet", **parse},
    )
    assert main(["run", str(plain), "--quiet"]) == 0
    assert main(["run", str(streamed), "--quiet"]) == 0
    a = pl.read_parquet(tmp_path / "out/plain.parquet")
    b = pl.read_parquet(tmp_path / "out/stream.parquet")
    assert b["ttft_s"].null_count() == 0
    assert "ttft_s" not in a.columns
    assert a.drop("latency_s").equals(b.drop("latency_s", "ttft_s"))


def test_stream_cut_midway_is_retried(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory(fail_share=0.5, fail_attempts_min=1, fail_attempts_max=1, faults=("cut",))
    job = write_job(tmp_path, server.url, request={"stream": True})
    assert main(["run", str(job), "--quiet"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert server.simulator.statuses["cut"] > 0
    assert out["attempts"].max() == 2
    assert out["response"].str.ends_with("The end.").all()


def test_silent_stream_times_out_and_is_retried(tmp_path: Path, sim_factory: SimFactory) -> None:
    server = sim_factory(
        fail_share=0.5, fail_attempts_min=1, fail_attempts_max=1, faults=("silence",), stall_s=20
    )
    job = write_job(
        tmp_path, server.url, request={"stream": True}, endpoint={"stream_idle_timeout_s": 0.3}
    )
    assert main(["run", str(job), "--quiet"]) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert server.simulator.statuses["silence"] > 0
    assert out["attempts"].max() == 2
    assert (out["latency_s"] < 20).all()  # no row sat out the server's 20 s of silence
