"""A local OpenAI-compatible chat-completions server for trying jobs offline and for tests.

Replies are derived from the request (same request, same reply), carry usage, honour ``n``,
``stop``, ``max_tokens``, ``tools`` and ``stream``, meet the schema of a forced tool or of a
``response_format`` of type ``json_schema`` (``sim/schema.py``; ``schema_violation_share`` of
them break it on purpose), and can be made to misbehave: latency,
rate limits enforced with 429 + Retry-After, and a share of rows that fail their first
attempts with chosen fault kinds. Markers in a prompt force an answer for that row:
``[[sim:400]]``, ``[[sim:401]]``, ``[[sim:402]]``, ``[[sim:invalid]]`` (arguments that break
the tool's schema), ``[[sim:n1]]`` (one choice whatever ``n`` asks).

``GET /sim/stats`` reports what the server saw; ``POST /sim/reset`` clears it.
"""

from batcher.sim.faults import FAULT_KINDS
from batcher.sim.hosting import SimulatorThread, serve
from batcher.sim.replies import count_tokens
from batcher.sim.server import SimSettings, Simulator

__all__ = ["FAULT_KINDS", "SimSettings", "Simulator", "SimulatorThread", "count_tokens", "serve"]
