"""Running the simulator: on the current event loop, or on its own loop in a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Self

from aiohttp import web

from batcher.sim.server import SimSettings, Simulator


@asynccontextmanager
async def serve_app(
    app: web.Application, *, port: int = 0, shutdown_timeout_s: float = 0.5
) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 for the duration; yields its base URL (``.../v1``)."""
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=shutdown_timeout_s
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    host, bound = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{bound}/v1"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serve(
    settings: SimSettings | None = None, *, port: int = 0
) -> AsyncIterator[tuple[str, Simulator]]:
    """Run the simulator on 127.0.0.1 for the duration; yields its base URL and state."""
    simulator = Simulator(settings)
    async with serve_app(simulator.app(), port=port) as url:
        yield url, simulator


class AppThread:
    """An aiohttp application served from its own event loop in a background thread, so a
    test or a script can run batcher's own loop beside it. ``app`` is called on that loop."""

    def __init__(
        self,
        app: Callable[[], web.Application],
        *,
        port: int = 0,
        name: str = "batcher-server",
        shutdown_timeout_s: float = 0.5,
    ) -> None:
        self.port = port
        self.url = ""
        self._make_app = app
        self._shutdown_timeout_s = shutdown_timeout_s
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError(f"{self._thread.name}: the server did not start within 30 s")
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
        app = self._make_app()
        async with serve_app(
            app, port=self.port, shutdown_timeout_s=self._shutdown_timeout_s
        ) as url:
            self.url = url
            self._ready.set()
            await self._stop.wait()


class SimulatorThread(AppThread):
    """The simulator on its own event loop in a background thread (for tests and scripts)."""

    def __init__(self, settings: SimSettings | None = None, *, port: int = 0) -> None:
        super().__init__(self._start, port=port, name="batcher-sim")
        self.settings = settings
        self._simulator: Simulator | None = None

    @property
    def simulator(self) -> Simulator:
        """The running simulator's state (what it saw, its settings)."""
        if self._simulator is None:
            raise RuntimeError("the simulator thread is not running")
        return self._simulator

    def _start(self) -> web.Application:
        self._simulator = Simulator(self.settings)
        return self._simulator.app()
