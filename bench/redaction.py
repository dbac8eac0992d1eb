"""Redaction benchmark: what keeping the key out of every Outcome costs per reply.

    python bench/redaction.py [--replies 100000] [--reply-bytes 2048]

Builds ``--replies`` Outcomes from replies of ``--reply-bytes`` of content (with tool calls,
reasoning and a parsed dict) through ``OutcomeBuilder.answered``, without a key and with one
(none of whose forms is in the replies, the usual case), and prints the time of each and
the difference per reply; then the cost of redacting a reply that does echo the key.
"""

from __future__ import annotations

import argparse
import random
import string
import tempfile
import time
from pathlib import Path

import yaml

from batcher.config import load_job
from batcher.rows.request import RowRequest
from batcher.send.client import Reply
from batcher.send.outcome import OutcomeBuilder
from batcher.send.prices import PriceTable
from batcher.send.tally import Tally

KEY = "sk-proj-" + "".join(random.Random(1).choices(string.ascii_letters + string.digits, k=48))


def replies(count: int, size: int, *, echo: bool = False) -> list[Reply]:
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(500)]
    made = []
    for number in range(count):
        text = " ".join(rng.choices(words, k=size // 5))[:size]
        if echo:
            text = text[: size // 2] + KEY + text[size // 2 :]
        message = {
            "role": "assistant",
            "content": text,
            "reasoning_content": text[:200],
            "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": text[:100]}}],
        }
        made.append(
            Reply(
                [{"index": 0, "message": message, "finish_reason": "stop"}],
                "gpt-4o-mini",
                f"chatcmpl-{number}",
                100,
                50,
                150,
                0,
            )
        )
    return made


def timed(builder: OutcomeBuilder, request: RowRequest, batch: list[Reply]) -> float:
    parsed = {"label": "positive", "reason": "short"}
    started = time.perf_counter()
    for reply in batch:
        builder.answered(request, [reply], [], parsed, 1, 0.1, costs=[0.001])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replies", type=int, default=100_000)
    parser.add_argument("--reply-bytes", type=int, default=2048)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        job_path = Path(folder) / "job.yaml"
        job_path.write_text(
            yaml.safe_dump(
                {
                    "name": "bench",
                    "input": {"path": "in.csv"},
                    "endpoint": {"base_url": "http://127.0.0.1:9/v1"},
                    "request": {"model": "gpt-4o-mini", "prompt": "{{ text }}"},
                }
            )
        )
        config = load_job(job_path).config
    request = RowRequest("k", {"model": "gpt-4o-mini"}, b"f", 0)
    prices = PriceTable.load()
    batch = replies(arguments.replies, arguments.reply_bytes)
    plain = OutcomeBuilder(config, prices, Tally())
    keyed = OutcomeBuilder(config, prices, Tally(), secret=KEY)
    timed(keyed, request, batch[:1000])  # warm: the key's forms are built once
    without = min(timed(plain, request, batch) for _ in range(3))
    with_key = min(timed(keyed, request, batch) for _ in range(3))
    echoed = replies(min(arguments.replies, 10_000), arguments.reply_bytes, echo=True)
    echoing = timed(keyed, request, echoed) / len(echoed)
    per_reply_us = (with_key - without) / len(batch) * 1e6
    print(f"{len(batch):,} replies of {arguments.reply_bytes:,} B")
    print(f"  no key:   {without:.3f} s ({without / len(batch) * 1e6:.2f} µs a reply)")
    print(f"  with key: {with_key:.3f} s ({with_key / len(batch) * 1e6:.2f} µs a reply)")
    print(f"  redaction: {per_reply_us:+.2f} µs a reply")
    print(f"  a reply that echoes the key: {echoing * 1e6:.2f} µs")


if __name__ == "__main__":
    main()
