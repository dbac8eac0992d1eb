"""Running the simulator: on the current event loop, or on its own loop in a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from batcher.sim.server import SimSettings, Simulator


@asynccontextmanager
async def serve(
    settings: SimSettings | None = None, *, port: int = 0
) -> AsyncIterator[tuple[str, Simulator]]:
    """Run the simulator on 127.0.0.1 for the duration; yields its base URL and state."""
    simulator = Simulator(settings)
    runner = web.AppRunner(
        simulator.app(), handle_signals=False, access_log=None, shutdown_timeout=0.5
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    host, bound = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{bound}/v1", simulator
    finally:
        await runner.cleanup()


class SimulatorThread:
    """The simulator on its own event loop in a background thread (for tests and scripts)."""

    def __init__(self, settings: SimSettings | None = None, *, port: int = 0) -> None:
        self.settings = settings
        self.port = port
        self.url = ""
        self._simulator: Simulator | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name="batcher-sim", daemon=True)

    @property
    def simulator(self) -> Simulator:
        """The running simulator's state (what it saw, its settings)."""
        if self._simulator is None:
            raise RuntimeError("the simulator thread is not running")
        return self._simulator

    def __enter__(self) -> SimulatorThread:
        self._thread.start()
        self._ready.wait(timeout=30)
        return self

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self.settings, port=self.port) as (url, simulator):
            self.url, self._simulator = url, simulator
            self._ready.set()
            await self._stop.wait()
