"""Input values arrive as written: CSV is text unless typed, nulls and nested cells are explicit,
and a value that breaks its declared type mid-run stops the run, not the answers before it."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from batcher.cli import main
from batcher.errors import InputError
from batcher.rows.source import Source
from batcher.sim import SimulatorThread
from tests.conftest import write_job


def run(job: Path, *extra: str) -> int:
    return main(["run", str(job), "--quiet", *extra])


def test_csv_ids_stay_as_written(tmp_path: Path, sim: SimulatorThread) -> None:
    (tmp_path / "data.csv").write_text("id,text\n007,a\n1,b\n01,c\n1.50,d\n")
    job = write_job(tmp_path, sim.url)
    assert run(job) == 0  # 1 and 01 are two ids, not a duplicate
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["id"].to_list() == ["007", "1", "01", "1.50"]
    assert "Review 007: a" in sim.simulator.usage_by_prompt
    assert "Review 1.50: d" in sim.simulator.usage_by_prompt


def test_a_column_changing_type_late_is_read_as_text(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    codes = [str(i) for i in range(10_050)]
    codes[10_020] = "A-17"  # past the 10,000 rows polars used to guess types from
    path = tmp_path / "data.csv"
    pl.DataFrame({"id": codes, "text": ["t"] * len(codes)}).write_csv(path)
    source = Source(str(path), None)
    assert source.schema["id"] == pl.String
    read = pl.concat(source.batches(["id"]))
    assert read["id"].to_list() == codes
    # Every row read and rendered end to end, nothing sent.
    job = write_job(tmp_path, sim.url)
    assert main(["estimate", str(job), "--json"]) == 0
    assert '"rows":10050' in capsys.readouterr().out


def test_declared_dtypes_type_the_columns(tmp_path: Path, sim: SimulatorThread) -> None:
    (tmp_path / "data.csv").write_text(
        "id,stars,score,ok_flag,day,text\n"
        "01,5,0.5,TRUE,2026-11-27,good\n"
        "02,1,1.25,false,2026-01-02,bad\n"
    )
    dtypes = {"stars": "int64", "score": "float64", "ok_flag": "bool", "day": "date"}
    job = write_job(
        tmp_path,
        sim.url,
        input={"dtypes": dtypes},
        request={"prompt": "{{ text }} {{ stars + 1 }} {{ day.year }}"},
    )
    assert run(job) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.schema["stars"] == pl.Int64
    assert out.schema["score"] == pl.Float64
    assert out["ok_flag"].to_list() == [True, False]
    assert out.schema["day"] == pl.Date
    assert set(sim.simulator.usage_by_prompt) == {"good 6 2026", "bad 2 2026"}


def test_arithmetic_on_csv_text_is_found_before_sending(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, sim.url, request={"prompt": "{{ stars + 1 }}"})
    assert run(job) == 2
    err = capsys.readouterr().err
    assert "request.prompt: rendering the input's first rows fails: TypeError" in err
    assert "input.dtypes" in err
    assert sim.simulator.requests == 0


def _write_rows(path: Path, rows: int, *, bad: int | None = None, column: str = "") -> None:
    frame = pl.DataFrame(
        {
            "id": [f"k{i:04d}" for i in range(rows)],
            "text": [f"text {i}" for i in range(rows)],
            "stars": [str(i % 5) for i in range(rows)],
            "note": ["7"] * rows,
        }
    )
    if bad is not None:
        frame = frame.with_columns(
            pl.when(pl.int_range(rows) == bad)
            .then(pl.lit("many"))
            .otherwise(pl.col(column))
            .alias(column)
        )
    frame.write_csv(path)


@pytest.mark.parametrize("column", ["stars", "note"])
def test_a_value_failing_its_dtype_mid_run_keeps_what_is_done(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str], column: str
) -> None:
    """Pre-flight reads only the first rows; row 251 breaks the declared type. The run stops
    with exit 3 naming row and column, and the output holds every row before it. (`note` is
    only kept, not templated: the output rebuild meets it, not the requests.)"""
    data = tmp_path / "rows.csv"
    _write_rows(data, 300)
    prompt = "{{ text }} ({{ stars }})"
    job = write_job(tmp_path, sim.url, input={"path": "rows.csv"}, request={"prompt": prompt})
    assert run(job) == 0
    assert sim.simulator.answered == 300

    _write_rows(data, 300, bad=250, column=column)
    typed = {"path": "rows.csv", "dtypes": {"stars": "int64", "note": "int64"}}
    job = write_job(tmp_path, sim.url, input=typed, request={"prompt": prompt})
    capsys.readouterr()
    assert run(job) == 3
    err = capsys.readouterr().err
    assert f"row 251, column {column!r}: 'many' does not parse as int64 (input.dtypes)" in err, err
    assert "Traceback" not in err
    assert sim.simulator.answered == 300  # nothing was paid twice
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.height == 250
    assert out["error"].null_count() == 250
    assert out["id"].to_list() == [f"k{i:04d}" for i in range(250)]
    assert out.schema["note"] == pl.Int64


def test_a_null_template_value_fails_its_row_alone(tmp_path: Path, sim: SimulatorThread) -> None:
    (tmp_path / "data.csv").write_text('id,text\na,hello\nb,\nc,""\n')
    job = write_job(tmp_path, sim.url)
    assert run(job) == 1
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["error"].to_list() == [None, "input_error: text is null", None]
    assert "Review b: None" not in sim.simulator.usage_by_prompt
    assert set(sim.simulator.usage_by_prompt) == {"Review a: hello", "Review c: "}


def test_allow_nulls_renders_them_empty(tmp_path: Path, sim: SimulatorThread) -> None:
    (tmp_path / "data.csv").write_text("id,text\na,hello\nb,\n")
    job = write_job(tmp_path, sim.url, input={"allow_nulls": True})
    assert run(job) == 0
    assert set(sim.simulator.usage_by_prompt) == {"Review a: hello", "Review b: "}


def test_lists_and_structs_render_as_json(tmp_path: Path, sim: SimulatorThread) -> None:
    data = pl.DataFrame(
        {
            "id": ["a"],
            "tags": [["red", "big"]],
            "meta": [{"size": 3, "name": "x"}],
        }
    )
    job = write_job(
        tmp_path,
        sim.url,
        data=data,
        fmt="parquet",
        input={"path": "data.parquet"},
        request={"prompt": "{{ tags }} {{ meta }} {{ meta.size }}"},
    )
    assert run(job) == 0
    assert set(sim.simulator.usage_by_prompt) == {'["red","big"] {"size":3,"name":"x"} 3'}


def test_a_path_with_brackets_is_a_file_name_when_it_exists(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    (tmp_path / "data[1].csv").write_text("id,text\na,hello\n")
    (tmp_path / "data1.csv").write_text("id,text\nz,the glob would pick me\n")
    job = write_job(tmp_path, sim.url, input={"path": "data[1].csv"})
    assert run(job) == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out["id"].to_list() == ["a"]


def test_an_input_without_rows_says_so(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data.csv").write_text("id,text\n")
    job = write_job(tmp_path, sim.url)
    assert run(job) == 2
    err = capsys.readouterr().err
    assert "data.csv: the input has no rows: there is nothing to send" in err


def test_a_damaged_line_is_found_before_sending_when_it_can_be(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = ["id,text", *(f"k{i:04d},t{i}" for i in range(300))]
    lines[251] += ",extra"
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    job = write_job(tmp_path, sim.url)
    assert run(job) == 2
    err = capsys.readouterr().err
    assert "data.csv: cannot read input: found more fields than defined" in err
    assert err.count("\n") == 1
    assert sim.simulator.requests == 0


def test_a_damaged_line_met_mid_read_bounds_the_good_rows(tmp_path: Path) -> None:
    """Far into a large file: the error says how far reading got (how many batches polars
    yields before it meets the line depends on its threads, none at times), and the output
    rebuild reads up to there cleanly."""
    lines = ["id,text", *(f"k{i:05d},t{i}" for i in range(30_000))]
    lines[25_001] += ",extra"
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n")
    source = Source(str(path), "id")
    heights: list[int] = []
    with pytest.raises(InputError) as caught:
        heights.extend(batch.height for batch in source.batches(["text"]))
    read = sum(heights)
    assert caught.value.row == read
    assert 0 <= read <= 25_000
    assert f"cannot read input after row {read}: found more fields" in str(caught.value)
    assert sum(b.height for b in source.batches(["text"], limit=read)) == read


def test_a_bad_typed_key_is_found_before_sending(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pre-flight reads the id column in full, so its declared type is checked on every row."""
    rows = "".join(f"{i},t{i}\n" for i in range(500))
    (tmp_path / "data.csv").write_text("id,text\n" + rows + "x1,late\n")
    job = write_job(tmp_path, sim.url, input={"dtypes": {"id": "int64"}})
    assert run(job) == 2
    err = capsys.readouterr().err
    assert "data.csv: row 501, column 'id': 'x1' does not parse as int64 (input.dtypes)" in err
    assert err.rstrip().endswith("fix it and run again")
    assert sim.simulator.requests == 0
