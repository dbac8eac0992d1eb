"""Pacing against a simulator that enforces its limit with 429 + Retry-After (tens of seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.pacing import CASES, pacing_case

ROWS = 600


@pytest.mark.slow
@pytest.mark.parametrize("case", ["rpm at limit", "tpm at limit"])
def test_configured_at_the_limit(tmp_path: Path, case: str) -> None:
    server, limits = CASES[case]
    result = pacing_case(ROWS, server, limits, tmp_path)
    assert result["rows_ok"] == ROWS
    assert result["share_429"] <= 0.01
    assert result["achieved_per_min"] >= 0.95 * result["limit_per_min"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["rpm 3x adaptive", "tpm 3x adaptive"])
def test_configured_above_the_limit_converges(tmp_path: Path, case: str) -> None:
    server, limits = CASES[case]
    result = pacing_case(ROWS, server, limits, tmp_path)
    assert result["rows_ok"] == ROWS
    assert result["share_429"] <= 0.05
    assert result["achieved_per_min"] >= 0.85 * result["limit_per_min"]
