"""The progress bar shows rows, and in its postfix ok/failed, retries, 429s, rate, tokens, cost."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from batcher.cli import main
from batcher.runs.progress import Progress
from batcher.send.tally import Tally
from tests.conftest import SimFactory, write_job


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_shows_counts_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    tally = Tally()
    progress = Progress(tally, 10, quiet=False)
    tally.ok, tally.failed, tally.retries, tally.rate_limited = 3, 1, 2, 1
    tally.prompt_tokens, tally.completion_tokens, tally.cost_usd = 120, 30, 0.0123
    progress.advance(4)
    progress.close()
    text = screen.getvalue()
    assert "4/10" in text
    assert "ok=3 failed=1 retries=2 429s=1" in text
    assert "tok=120/30 $0.0123" in text


def test_quiet_and_not_a_terminal_show_only_the_summary(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    job = write_job(tmp_path, server.url)
    assert main(["run", str(job)]) == 0  # stderr is captured: not a terminal
    err = capsys.readouterr().err
    assert "row/s" not in err
    assert err.startswith("rows: 20 ok, 0 failed, 0 pending of 20")


def test_unpriced_rows_show_as_unknown_not_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    tally = Tally()
    progress = Progress(tally, 10, quiet=False, every_s=1.0)
    tally.ok, tally.unpriced_rows = 4, 4
    progress.advance(4)
    progress.close()
    assert "unknown (4 rows of unpriced models)" in screen.getvalue()
    tally.cost_usd = 0.0123
    line = progress.status_line(1.0)
    assert line.endswith("$0.0123 + unknown for 4 rows of unpriced models")
