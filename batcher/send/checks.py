"""Where a reply's schema check runs, and for how long: never on the event loop, never unbounded.

jsonschema is Python code that can take any time on a hostile reply (``uniqueItems`` over many
objects is quadratic). Most checks run in a thread: a thread yields the GIL every 5 ms, so the
loop goes on, but it cannot be stopped, so at most ``stuck_checks`` may run past their time.
``re`` holds the GIL for a whole match (measured: a thread matching ``^(a+)+$`` against 24
"a" and a "b" let the loop run once in a second, and 30 take an hour), so a schema with
``pattern`` or ``patternProperties`` is checked in a worker process, killed past its time.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import anyio
import anyio.to_process
import jsonschema
import orjson

# A real reply is checked in milliseconds; past this the check is a pattern backtracking or a
# quadratic keyword, and its attempt fails. It also covers starting a worker process (~1.5 s
# on a loaded machine, once per worker).
CHECK_TIME_S = 10.0
# Checks that may run on in their thread past CHECK_TIME_S; beyond, a check fails at once
# rather than pile up threads that each take a share of the GIL.
STUCK_CHECKS = 4

_validators: dict[str, Any] = {}  # a worker process's validators, by schema text


def validate(validator: Any, text: str) -> tuple[Any, str | None]:
    """The value ``text`` holds and None, or None and why it does not fit (blocking)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return None, f"not JSON ({exc})"
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return None, f"{where}: {error.message}"
    if not isinstance(value, dict):
        return None, "the value is not a JSON object"
    return value, None


def validate_in_worker(schema_text: str, text: str) -> tuple[Any, str | None]:
    """``validate`` in a worker process, which keeps each schema's validator."""
    validator = _validators.get(schema_text)
    if validator is None:
        schema = orjson.loads(schema_text)
        validator = _validators[schema_text] = jsonschema.validators.validator_for(schema)(schema)
    return validate(validator, text)


def _ready() -> None:
    """Nothing: run in a worker, it starts one or finds one idle."""


def uses_patterns(schema: Any) -> bool:
    """Whether ``pattern`` or ``patternProperties`` appears anywhere in ``schema``."""
    if isinstance(schema, dict):
        if "pattern" in schema or "patternProperties" in schema:
            return True
        return any(uses_patterns(value) for value in schema.values())
    if isinstance(schema, list):
        return any(uses_patterns(value) for value in schema)
    return False


class SchemaChecks:
    """Checks replies against one schema off the event loop, each within ``check_time_s``."""

    def __init__(
        self,
        schema: dict[str, Any],
        *,
        check_time_s: float | None = None,
        stuck_checks: int = STUCK_CHECKS,
    ) -> None:
        self.validator: Any = jsonschema.validators.validator_for(schema)(schema)
        self.check_time_s = CHECK_TIME_S if check_time_s is None else check_time_s
        self.stuck_checks = stuck_checks
        self.in_process = uses_patterns(schema)
        self._schema_text = orjson.dumps(schema).decode()
        self._slots: anyio.CapacityLimiter | None = None  # made on the run's event loop
        self._stuck = 0  # checks past their time, still running in their thread
        self._lock = threading.Lock()

    async def check(self, text: str) -> tuple[Any, str | None]:
        """``validate``, off the loop: past ``check_time_s`` (or with too many checks still
        running past it) the text does not fit, and the why says so."""
        if self._stuck >= self.stuck_checks:
            return None, f"not checked: {self._stuck} checks still run past their time"
        if self._slots is None:
            self._slots = anyio.CapacityLimiter(os.cpu_count() or 2)
        async with self._slots:  # waiting for a slot is not the check's time
            if not self.in_process:
                with anyio.move_on_after(self.check_time_s):
                    return await self._in_thread(text)
                return None, f"the schema check took over {self.check_time_s:g} s"
            try:
                # Nor is starting a worker (importing batcher: seconds on a loaded machine).
                await anyio.to_process.run_sync(_ready)
                with anyio.move_on_after(self.check_time_s):
                    return await anyio.to_process.run_sync(
                        validate_in_worker, self._schema_text, text, cancellable=True
                    )
            except anyio.BrokenWorkerProcess as exc:
                # A worker runs the main script again first: unguarded, its run fails.
                return None, (
                    f"the schema check's worker process broke ({exc}); a script that "
                    'calls batcher.run needs `if __name__ == "__main__":`'
                )
        return None, f"the schema check took over {self.check_time_s:g} s"

    async def _in_thread(self, text: str) -> tuple[Any, str | None]:
        state = {"started": False, "done": False, "abandoned": False}

        def run() -> tuple[Any, str | None]:
            with self._lock:
                if state["abandoned"]:
                    return None, None  # given up before it began: nobody reads this
                state["started"] = True
            try:
                return validate(self.validator, text)
            finally:
                with self._lock:
                    state["done"] = True
                    self._stuck -= state["abandoned"]

        try:
            return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
        finally:
            with self._lock:
                if not state["done"]:
                    state["abandoned"] = True
                    self._stuck += state["started"]
