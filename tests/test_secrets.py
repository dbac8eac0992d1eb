"""Secrets stay secret: the key a server echoes is in no file and on no terminal line, in no
form; a server's escape sequences reach no terminal."""

from __future__ import annotations

import base64
import binascii
import json
import unicodedata
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.cli import main
from batcher.config import load_job
from batcher.errors import printable
from batcher.runs.batch.book import BookRow
from batcher.runs.batch.results import Collector, read_results
from batcher.send.outcome import OutcomeBuilder
from batcher.send.parse import OutputParser
from batcher.send.prices import PriceTable
from batcher.send.redaction import REDACTED, redact, redactor_for
from batcher.send.tally import Tally
from batcher.store.columns import Outcome
from tests.conftest import TEST_KEY, reviews, write_job
from tests.echo_server import ESCAPES, EchoServer, completion, echoes
from tests.leaks import forms, leaks

KEY_CHARS = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=16, max_size=60)


def betrays(text: str, key: str = TEST_KEY) -> list[bytes]:
    lowered = text.lower().encode()
    return [form for form in forms(key) if form in lowered]


def hidden(text: str, key: str) -> bool:
    """No stretch of ``text`` decodes (base64, either alphabet) or unquotes to the key."""
    if key.lower() in text.lower() or key.lower() in unquote(text).lower():
        return False
    raw = key.encode()
    for start in range(len(text)):
        for end in range(start + len(raw), len(text) + 1):
            piece = text[start:end]
            for padded in (piece, piece + "=", piece + "=="):
                for alphabet in (b"+/", b"-_"):
                    try:
                        if raw in base64.b64decode(padded, altchars=alphabet, validate=True):
                            return False
                    except (binascii.Error, ValueError):
                        pass
    return True


@given(
    key=KEY_CHARS,
    before=st.binary(max_size=5),
    after=st.binary(max_size=5),
    urlsafe=st.booleans(),
    padded=st.booleans(),
)
def test_base64_of_the_key_in_any_wrapper_is_redacted(
    key: str, before: bytes, after: bytes, urlsafe: bool, padded: bool
) -> None:
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    encoded = encode(before + key.encode() + after).decode()
    encoded = encoded if padded else encoded.rstrip("=")
    text = f"refused: Basic {encoded} (retry)"
    redacted = redact(text, key)
    assert REDACTED in redacted
    assert hidden(redacted, key), redacted


@given(key=KEY_CHARS)
def test_the_key_raw_and_percent_encoded_is_redacted(key: str) -> None:
    from urllib.parse import quote

    for form in (key, key.upper(), quote(key, safe=""), quote(key), quote(key).lower()):
        redacted = redact(f"see {form}!", key)
        assert key.lower() not in unquote(redacted).lower()


def test_a_placeholder_key_leaves_answers_alone() -> None:
    # vLLM's "EMPTY": an answer that says the word is not rewritten...
    answer = Outcome("k", b"f", ok=True, response="the box is empty")
    assert redactor_for("EMPTY").outcome(answer) is answer
    # ...but an error text never quotes it.
    assert redact("bad key EMPTY", "EMPTY") == "bad key ***"


def test_redaction_keeps_what_holds_no_key() -> None:
    redactor = redactor_for(TEST_KEY)
    parsed: dict[str, Any] = {"label": "fine", "tags": ["a", "b"], "n": 3}
    assert redactor.value(parsed) is parsed  # nothing copied when nothing changes
    echoed = redactor.value({"label": f"k={TEST_KEY}", "tags": ["a", TEST_KEY.upper()]})
    assert echoed == {"label": "k=***", "tags": ["a", "***"]}


@pytest.mark.parametrize("stream", [False, True])
def test_key_echoed_in_answers_is_in_no_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stream: bool
) -> None:
    with EchoServer() as server:
        job = write_job(tmp_path, server.url, data=reviews(6), request={"stream": stream})
        assert main(["run", str(job), "--quiet"]) == 0
        assert main(["status", str(job)]) == 0
    assert server.keys == {f"Bearer {TEST_KEY}": 6}  # the key went, and came back 6 times
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    row = out.row(0, named=True)
    for column in ("response", "response_id", "model", "tool_calls", "reasoning"):
        assert REDACTED in row[column], (column, row[column])  # the echo did arrive
    assert "Basic dXNlcjp***" in row["response"]
    captured = capsys.readouterr()
    assert betrays(captured.out + captured.err) == []
    assert leaks([tmp_path], [TEST_KEY]) == []


def test_key_in_a_refusal_is_on_no_terminal_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = reviews(4).with_columns(("[[echo401]] " + reviews(4)["text"]).alias("text"))
    with EchoServer() as server:
        job = write_job(tmp_path, server.url, data=data, limits={"concurrency": 1})
        assert main(["run", str(job), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "refused the API key" in err
    assert "Basic dXNlcjp***" in err  # base64 of "user:" and the key: the key is gone
    assert betrays(err) == []
    assert leaks([tmp_path], [TEST_KEY]) == []


@pytest.mark.parametrize("marker", ["[[escape401]]", "[[escape-model]]"])
def test_a_server_s_escape_sequences_reach_no_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], marker: str
) -> None:
    data = reviews(3).with_columns((marker + " " + reviews(3)["text"]).alias("text"))
    with EchoServer() as server:
        # A model without a price: the summary warns of the name the server answered with.
        request = {"model": "house-model"}
        job = write_job(tmp_path, server.url, data=data, limits={"concurrency": 1}, request=request)
        main(["run", str(job), "--quiet"])
    if marker == "[[escape-model]]":
        main(["cost", str(tmp_path / "out" / "result.parquet"), "--by", "model"])
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    said = "invalid key" if marker == "[[escape401]]" else "no price for model model"
    line = next(line for line in printed.splitlines() if said in line)
    assert "rows: 20 ok, 0 failed" in line  # the server's words are there, on our line
    if marker == "[[escape-model]]":
        assert any(line.startswith("model????rows: 20 ok") for line in captured.out.splitlines())
    for control in ("\x1b", "\x07", "\x9b", "\r"):
        assert control not in printed


@given(st.text())
def test_printable_leaves_no_control_character(text: str) -> None:
    shown = printable(text)
    bidi = set("\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
    controls = [c for c in shown if c in bidi or (unicodedata.category(c) == "Cc" and c != "\t")]
    assert controls == [], repr(shown)
    if text.isprintable():
        assert shown == text


def test_printable_blanks_each_sequence_whole() -> None:
    assert printable(ESCAPES) == "????rows: 20 ok, 0 failed"
    assert printable("a\x1b]0;title\x1b\\b\u202ec") == "a?b?c"


@pytest.mark.anyio
async def test_batch_results_keep_no_key(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, "http://127.0.0.1:9/v1", retry={"max_attempts": 1}))
    tally = Tally()
    prices = PriceTable.load().for_batch()
    builder = OutcomeBuilder(job.config, prices, tally, secret=TEST_KEY)
    collector = Collector(job.config, builder, OutputParser(job.config), secret=TEST_KEY)
    rows = [
        BookRow(k, f"id-{k}", "c", "submitted", b"f", None, 1, 1, None, 0.0, None) for k in "ab"
    ]
    answered = {"status_code": 200, "body": completion(TEST_KEY, f"m-{TEST_KEY}")}
    refused = {"code": TEST_KEY, "message": echoes(TEST_KEY)}  # a batch line's own error
    lines = [
        {"custom_id": "id-a", "response": answered, "error": None},
        {"custom_id": "id-b", "response": None, "error": refused},
    ]
    results = read_results(b"\n".join(json.dumps(line).encode() for line in lines))
    collected = await collector.collect(rows, results, "completed", cancelled_by_us=False)
    texts = json.dumps([repr(o) for o in collected.outcomes] + [repr(u) for u in collected.updates])
    assert REDACTED in texts
    assert betrays(texts) == []
    assert betrays(" ".join(tally.errors) + " ".join(tally.warnings)) == []
