"""limits.max_cost_usd against servers that bill what batcher cannot see coming: replies
without usage, prompts billed a token a byte, replies as long as the model allows, usage
below zero. A small hostile server over real loopback HTTP bills each request by its own
rule and keeps what it charged; the job's cap must hold against that, not against what the
replies said."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest

from batcher.cli import main
from batcher.config import load_job
from batcher.errors import BudgetReachedError
from batcher.reports.status import job_status
from batcher.rows.request import ImagePart, RowRequest
from batcher.send.bound import DEFAULT_MAX_OUTPUT_TOKENS, image_tokens, request_bound
from batcher.send.budget import Budget, BudgetStop, budget_reached
from batcher.send.prices import Price, PriceTable
from batcher.send.tally import Tally
from tests.conftest import MODEL, SimFactory, write_job

PRICE = PriceTable.load().get(MODEL)
assert PRICE is not None

# (prompt tokens billed, completion tokens billed, usage reported or None) for one body.
Billing = Callable[[dict[str, Any]], tuple[int, int, dict[str, int] | None]]


def texts(body: dict[str, Any]) -> list[str]:
    found = []
    for message in body["messages"]:
        content = message["content"]
        found += [content] if isinstance(content, str) else [p.get("text", "") for p in content]
    return found


def a_token_a_byte(body: dict[str, Any]) -> int:
    """The most a byte-level tokenizer can bill: every byte a token, a few per message."""
    return sum(len(text.encode()) for text in texts(body)) + 4 * len(body["messages"])


@dataclass
class Hostile:
    """What the server charged (its own figures, whatever it reported) and was asked."""

    billing: Billing
    requests: int = 0
    charged_usd: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt, completion, usage = self.billing(body)
        with self.lock:
            self.requests += 1
            self.charged_usd += PRICE.cost(prompt, completion)  # type: ignore[union-attr]
        reply: dict[str, Any] = {
            "id": f"r{self.requests}",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
        }
        if usage is not None:
            reply["usage"] = usage
        return reply


@pytest.fixture
def hostile() -> Iterator[Callable[[Billing], tuple[str, Hostile]]]:
    servers: list[ThreadingHTTPServer] = []

    def start(billing: Billing) -> tuple[str, Hostile]:
        state = Hostile(billing)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = orjson.loads(self.rfile.read(int(self.headers["content-length"])))
                content = orjson.dumps(state.answer(body))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/v1", state

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def run_capped(folder: Path, url: str, data: pl.DataFrame, cap: float, **request: Any) -> int:
    job = write_job(folder, url, data=data, request=request, limits={"max_cost_usd": cap})
    return main(["run", str(job), "--quiet"])


def rows(count: int, text: str = "a short review") -> pl.DataFrame:
    return pl.DataFrame({"id": [f"k{i:05d}" for i in range(count)], "text": [text] * count})


def test_replies_without_usage_are_charged_their_worst_case(
    tmp_path: Path,
    hostile: Callable[[Billing], tuple[str, Hostile]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """2,000 rows on a $0.001 cap and a server that never says what it billed: each reply is
    charged what its request held, so the run stops at the cap (not after every row) and
    says how many replies came without usage; the journal counts the charge, so a rerun
    at the same cap sends nothing."""
    url, server = hostile(lambda body: (a_token_a_byte(body), 32, None))
    cap = 0.001
    assert run_capped(tmp_path, url, rows(2000), cap) == 3
    err = capsys.readouterr().err
    assert server.charged_usd <= cap
    assert 0 < server.requests < 20
    assert "warning: a reply came without usage: charged its request's worst case" in err
    assert f"({server.requests}×)" in err
    output = pl.read_parquet(tmp_path / "out" / "result.parquet").filter(pl.col("error").is_null())
    assert output.height == server.requests
    assert output["cost_usd"].null_count() == 0
    assert output["prompt_tokens"].null_count() == output.height
    spent = job_status(load_job(tmp_path / "job.yaml")).spent.cost_usd
    assert server.charged_usd <= spent <= cap
    sent = server.requests
    assert run_capped(tmp_path, url, rows(2000), cap) == 3
    assert server.requests == sent  # the charge is the job's: nothing sent again


def test_prompts_billed_a_token_a_byte_stay_within_the_cap(
    tmp_path: Path, hostile: Callable[[Billing], tuple[str, Hostile]]
) -> None:
    """Chinese text, three bytes a character, billed a token a byte: four characters a
    token undercounts it eightfold; the byte bound holds."""
    billed = lambda body: (a_token_a_byte(body), 5, usage(a_token_a_byte(body), 5))  # noqa: E731
    url, server = hostile(billed)
    cap = 0.02
    assert run_capped(tmp_path, url, rows(400, "评论" * 200), cap) == 3
    assert 0 < server.requests < 400
    spent = job_status(load_job(tmp_path / "job.yaml")).spent.cost_usd
    assert spent == pytest.approx(server.charged_usd)
    assert spent <= cap


def test_without_max_tokens_each_request_holds_the_models_longest_output(
    tmp_path: Path,
    hostile: Callable[[Billing], tuple[str, Hostile]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No request.max_tokens and 4,096-token replies: each request holds the model's most
    (8,192 for this one), so the cap holds; a cap below one request's worst case stops
    before anything is sent, saying so and that request.max_tokens would lower it."""
    long = lambda body: (a_token_a_byte(body), 4096, usage(a_token_a_byte(body), 4096))  # noqa: E731
    url, server = hostile(long)
    cap = 0.05
    (tmp_path / "a").mkdir()
    assert run_capped(tmp_path / "a", url, rows(200), cap, max_tokens=None) == 3
    assert 0 < server.requests < 200
    assert server.charged_usd <= cap
    err = capsys.readouterr().err
    assert "or set request.max_tokens" in err

    url, nothing = hostile(long)
    (tmp_path / "b").mkdir()
    assert run_capped(tmp_path / "b", url, rows(200), 0.01, max_tokens=None) == 3
    assert nothing.requests == 0
    stopped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1
    assert "the next request may cost up to $0.03" in stopped[0]
    assert "more than the $0.0100 left" in stopped[0]
    assert "or set request.max_tokens" in stopped[0]


def test_usage_below_zero_never_lowers_the_spend(
    tmp_path: Path, hostile: Callable[[Billing], tuple[str, Hostile]]
) -> None:
    """A server reporting a million prompt tokens below zero is never a credit: no row's
    cost, nor the job's spend, goes below what the other tokens cost, nor the cap."""
    negative = lambda body: (a_token_a_byte(body), 5, usage(-1_000_000, 5))  # noqa: E731
    url, server = hostile(negative)
    cap = 0.002
    code = run_capped(tmp_path, url, rows(300), cap)
    assert code in (1, 3)  # stopped by the cap, or the reply refused as bad
    output = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert (output["cost_usd"].drop_nulls() >= 0).all()
    spent = job_status(load_job(tmp_path / "job.yaml")).spent.cost_usd
    assert 0 <= spent <= cap
    assert server.requests < 300 or code == 1


def test_an_unpriced_model_in_extra_body_is_exit_2(
    tmp_path: Path, sim_factory: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sim_factory()
    job = write_job(
        tmp_path,
        server.url,
        request={"extra_body": {"model": "gpt-unpriced"}},
        limits={"max_cost_usd": 1.0},
    )
    assert main(["run", str(job), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model gpt-unpriced has no price (request.extra_body.model sets it)" in err
    assert server.simulator is not None
    assert server.simulator.requests == 0


def test_fresh_starts_the_spend_anew(tmp_path: Path, sim_factory: SimFactory) -> None:
    """--fresh replaces the checkpoint, and with it what the job had spent."""
    server = sim_factory()
    data = rows(100)
    job = write_job(tmp_path, server.url, data=data, limits={"max_cost_usd": 0.002})
    assert main(["run", str(job), "--quiet"]) == 3
    assert server.simulator is not None
    first = server.simulator.answered
    assert main(["run", str(job), "--quiet"]) == 3
    assert server.simulator.answered == first
    assert main(["run", str(job), "--quiet", "--fresh"]) == 3
    assert server.simulator.answered == 2 * first


# -- the bound, unit by unit -----------------------------------------------------------------


def body(content: Any, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def test_the_prompt_bound_counts_bytes_so_any_script_is_covered() -> None:
    chinese = "评论" * 500  # 1,000 characters, 3,000 bytes
    bound = request_bound(RowRequest("k", body(chinese, max_tokens=10), b"f", 0), PRICE)
    assert bound.prompt_tokens >= 3000 > (len(chinese) + 3) // 4 * 1.5
    assert bound.completion_tokens == 10
    assert bound.output_limited


def test_the_output_bound_is_max_tokens_per_choice_else_the_models_most() -> None:
    def completion(fields: dict[str, Any], price: Price | None = PRICE) -> int:
        return request_bound(
            RowRequest("k", body("hi", **fields), b"f", 0), price
        ).completion_tokens

    assert completion({"max_tokens": 100, "n": 3}) == 300
    assert completion({"max_completion_tokens": 50}) == 50
    assert completion({}) == 8192  # the table's max_output_tokens for the model
    assert completion({}, None) == DEFAULT_MAX_OUTPUT_TOKENS
    assert completion({}, Price(1, 1, max_output_tokens=77)) == 77


def test_images_are_bounded_by_the_providers_rule() -> None:
    assert image_tokens(750, 1) == 1
    assert image_tokens(3136, 3136) == image_tokens(1568, 1568) == 3279  # downsized first
    assert image_tokens(0, 0) == 3279  # unknown size: the largest
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "d"}}]
    request = RowRequest(
        "k", body(parts, max_tokens=1), b"f", 0, images=(ImagePart(width=1568, height=1568),)
    )
    assert request_bound(request, PRICE).prompt_tokens > 3279


def test_a_job_price_keeps_the_tables_output_limit_unless_it_sets_one() -> None:
    table = PriceTable.load(overrides={MODEL: load_job_price(input=1, output=2)})
    price = table.get(MODEL)
    assert price is not None
    assert price.input == 1
    assert price.max_output_tokens == 8192
    table = PriceTable.load(
        overrides={MODEL: load_job_price(input=1, output=2, max_output_tokens=9)}
    )
    assert table.get(MODEL).max_output_tokens == 9  # type: ignore[union-attr]


def load_job_price(**fields: Any) -> Any:
    from batcher.config import PriceConfig

    return PriceConfig(**fields)


def test_no_cost_is_a_credit() -> None:
    price = Price(input=1_000_000, output=1_000_000)
    assert price.cost(-50, 3, cached_tokens=-7) == 3.0
    tally = Tally(cost_usd=2.0)
    Budget(10.0, PriceTable({}), tally).settle(-5.0)
    assert tally.cost_usd == 2.0


def test_a_budget_stop_says_what_the_job_spent_and_what_is_left() -> None:
    tally = Tally(cost_usd=0.5)
    budget = Budget(1.0, PriceTable({MODEL: PRICE}), tally, spent_before_usd=0.4)  # type: ignore[dict-item]
    request = RowRequest("k", body("x" * 100_000), b"f", 0)  # no max_tokens: 8,192 out
    with pytest.raises(BudgetStop) as stop:
        budget.reserve(request)
    error = stop.value.error
    assert isinstance(error, BudgetReachedError)
    assert str(error).startswith("the job has spent $0.9000 of its limits.max_cost_usd=1, and ")
    assert "more than the $0.1000 left" in str(error)
    assert "request.max_tokens" in str(error)
    assert str(budget_reached(1.0, 1.0)) == (
        "the job has spent $1.0000 of its limits.max_cost_usd=1; raise limits.max_cost_usd to go on"
    )
