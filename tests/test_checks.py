"""Schema checks run off the event loop, each within its time; those that run on past it
(a thread cannot be stopped) are bounded in number. On virtual time (trio's MockClock)."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
from trio.testing import MockClock

from batcher.send import checks as checks_module
from batcher.send.checks import SchemaChecks, uses_patterns
from tests.conftest import wait_for


def on_virtual_time(function: Any) -> Any:
    return anyio.run(
        function, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)}
    )


def test_checks_past_their_time_fail_and_at_most_stuck_checks_run_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release, started = threading.Event(), threading.Event()
    honest = checks_module.validate

    def endless(validator: Any, text: str) -> tuple[Any, str | None]:
        started.set()
        assert release.wait(60), "never released"
        return honest(validator, text)

    monkeypatch.setattr(checks_module, "validate", endless)
    checks = SchemaChecks({"type": "object"}, stuck_checks=2)
    assert not checks.in_process

    async def started_check() -> tuple[Any, str | None]:
        """A check whose thread surely began before time jumped: until it has, a task keeps
        the loop busy (virtual time moves only when every task waits)."""
        started.clear()

        async def busy() -> None:
            while not started.is_set():
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as group:
            group.start_soon(busy)
            return await checks.check("{}")
        raise AssertionError("unreachable: the group ends with the check")

    async def three() -> list[tuple[Any, str | None]]:
        return [await started_check(), await started_check(), await checks.check("{}")]

    first, second, third = on_virtual_time(three)
    assert first == second == (None, "the schema check took over 10 s")
    assert third == (None, "not checked: 2 checks still run past their time")
    release.set()
    wait_for(lambda: checks._stuck == 0)


def test_only_schemas_with_patterns_are_checked_in_a_process() -> None:
    assert uses_patterns({"properties": {"a": {"items": [{"pattern": "^x"}]}}})
    assert uses_patterns({"patternProperties": {"^x": {}}})
    assert not uses_patterns({"properties": {"a": {"type": "string", "maxLength": 3}}})
