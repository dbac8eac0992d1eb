"""`batcher agree`: agreement and kappa on a known table, checked against values by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batcher.cli import main
from batcher.sim import SimulatorThread
from tests.conftest import MODEL, write_job

# Nine rows labelled by raters A, B and C (y = yes, n = no, - = C's row failed). Row 10 failed
# for everyone. Labels are written with mixed case and spaces: they compare after trim + fold.
TABLE = [
    ("y", "y", "y"),
    ("y", "y", "n"),
    ("n", "n", "n"),
    ("n", "y", "n"),
    ("y", "y", "y"),
    ("n", "n", "y"),
    ("y", "n", "n"),
    ("n", "n", "n"),
    ("y", "y", "-"),
    ("-", "-", "-"),
]
SPELLING = {"y": [" Yes", "YES", "yes\n"], "n": ["no", " No ", "NO"]}
# By hand:
# A-B over rows 1-9: agree on 1,2,3,5,6,8,9 = 7/9; A has 5 y / 4 n, B 5 y / 4 n;
#   chance = (5/9)^2 + (4/9)^2 = 41/81; kappa = (63/81 - 41/81) / (40/81) = 22/40 = 0.55.
# A-C over rows 1-8: agree on 1,3,4,5,8 = 5/8; A 4 y / 4 n, C 3 y / 5 n;
#   chance = (4·3 + 4·5) / 64 = 1/2; kappa = (5/8 - 1/2) / (1/2) = 1/4.
# B-C over rows 1-8: agree on 1,3,5,7,8 = 5/8; B 4 y / 4 n, C 3 y / 5 n; kappa = 1/4.
# Fleiss over rows 1-9 (row 9 has two votes): P_i = (sum n_ij^2 - n_i) / (n_i (n_i - 1)):
#   rows 1,3,5,8,9 agree fully (1 each), rows 2,4,6,7 are 2-1 splits ((4+1-3)/6 = 1/3 each);
#   mean P = (5 + 4/3) / 9 = 19/27; y votes 13 of 26, so chance = 1/2;
#   kappa = (19/27 - 1/2) / (1/2) = 38/27 - 1 = 11/27.
EXPECTED_PAIRS = [
    ("A", "B", 7 / 9, 0.55),
    ("A", "C", 5 / 8, 0.25),
    ("B", "C", 5 / 8, 0.25),
]
FLEISS = 11 / 27
MAJORITY = [
    ("y", 1.0, 3),
    ("y", 2 / 3, 3),
    ("n", 1.0, 3),
    ("n", 2 / 3, 3),
    ("y", 1.0, 3),
    ("n", 2 / 3, 3),
    ("n", 2 / 3, 3),
    ("n", 1.0, 3),
    ("y", 1.0, 2),
    (None, None, 0),
]


def spelled(label: str, row: int) -> str | None:
    return None if label == "-" else SPELLING[label][row % 3]


def by_model_output(path: Path) -> Path:
    """The table as the output of a job with a model list: one row per (row, rater)."""
    records: list[dict[str, Any]] = []
    for row, labels in enumerate(TABLE):
        for rater, label in zip("ABC", labels, strict=True):
            failed = label == "-"
            records.append(
                {
                    "id": f"r{row}",
                    "request_model": rater,
                    "response": None if failed else spelled(label, row),
                    "error": "http_500: simulated" if failed else None,
                }
            )
    pl.DataFrame(records).write_parquet(path)
    return path


def choices_output(path: Path) -> Path:
    """The table as the output of a job with n=3: the choices in `responses`."""
    responses = [[spelled(label, row) for label in labels] for row, labels in enumerate(TABLE)]
    pl.DataFrame(
        {
            "id": [f"r{row}" for row in range(len(TABLE))],
            "response": [r[0] for r in responses],
            "responses": [*responses[:-1], None],
            "error": [None] * (len(TABLE) - 1) + ["timeout: no reply"],
        }
    ).write_parquet(path)
    return path


def agree(capsys: pytest.CaptureFixture[str], *arguments: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["agree", *arguments, "--json"]) == 0
    return dict(json.loads(capsys.readouterr().out))


def check(result: dict[str, Any], raters: list[str]) -> None:
    assert result["rows"] == 10
    assert result["raters"] == raters
    assert result["split_rows"] == 4
    names = dict(zip("ABC", raters, strict=True))
    pairs = [(p["a"], p["b"], p["agreement"], p["kappa"]) for p in result["pairs"]]
    assert pairs == [
        (names[a], names[b], pytest.approx(agreement), pytest.approx(kappa))
        for a, b, agreement, kappa in EXPECTED_PAIRS
    ]
    assert result["fleiss_kappa"] == pytest.approx(FLEISS)


def test_kappas_by_model_match_the_hand_computed_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = by_model_output(tmp_path / "labels.parquet")
    out = tmp_path / "majority.parquet"
    result = agree(
        capsys, str(output), "--column", "response", "--by", "request_model", "--out", str(out)
    )
    check(result, ["A", "B", "C"])
    majority = pl.read_parquet(out)
    assert majority.columns == ["id", "majority", "vote_share", "votes"]
    assert majority["id"].to_list() == [f"r{row}" for row in range(10)]
    labels = {"y": "yes", "n": "no", None: None}
    expected = [(labels[label], share, votes) for label, share, votes in MAJORITY]
    got = list(majority.select("majority", "vote_share", "votes").iter_rows())
    assert [(m, v) for m, _, v in got] == [(m, v) for m, _, v in expected]
    assert [s for _, s, _ in got] == [
        None if s is None else pytest.approx(s) for _, s, _ in expected
    ]
    capsys.readouterr()
    assert main(["agree", str(output), "--column", "response", "--by", "request_model"]) == 0
    text = capsys.readouterr().out
    assert "Fleiss' kappa: 0.407" in text
    assert "split vote: 4 rows: r1, r3, r5, r6" in text


def test_kappas_over_the_n_choices_of_each_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = choices_output(tmp_path / "choices.parquet")
    check(agree(capsys, str(output), "--column", "response"), ["choice 1", "choice 2", "choice 3"])
    check(agree(capsys, str(output), "--column", "responses"), ["choice 1", "choice 2", "choice 3"])


def test_agree_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = by_model_output(tmp_path / "labels.parquet")
    assert main(["agree", str(output), "--column", "response"]) == 2
    assert "--by" in capsys.readouterr().err
    assert main(["agree", str(output), "--column", "label", "--by", "request_model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "--column label: no such column" in err
    assert main(["agree", str(tmp_path / "none.parquet"), "--column", "response"]) == 2


def test_agree_on_a_real_run_of_two_models(
    tmp_path: Path, sim: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(
        tmp_path,
        sim.url,
        request={
            "model": [MODEL, "claude-sonnet-4-20250514"],
            "prompt": "{{ text }}. Answer with one word: positive, negative or neutral.",
        },
    )
    assert main(["run", str(job), "--quiet"]) == 0
    output = tmp_path / "out/result.parquet"
    result = agree(capsys, str(output), "--column", "response", "--by", "request_model")
    frame = pl.read_parquet(output)
    first = frame.filter(pl.col("request_model") == MODEL)["response"].to_list()
    second = frame.filter(pl.col("request_model") != MODEL)["response"].to_list()
    same = sum(a == b for a, b in zip(first, second, strict=True))
    assert result["rows"] == 20
    assert result["raters"] == [MODEL, "claude-sonnet-4-20250514"]
    assert result["pairs"][0]["agreement"] == pytest.approx(same / 20)
    assert 0 < same < 20  # the simulator's two models do disagree on some rows
