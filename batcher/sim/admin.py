"""The simulator's routes: the chat endpoint, the Batch API, and its own ``/sim/*`` controls."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from batcher.sim.server import Simulator

_EMPTY = b"{}"


def make_app(simulator: Simulator) -> web.Application:
    """The aiohttp application serving ``simulator``."""

    async def stats(_: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(simulator.stats()), content_type="application/json")

    async def set_limits(request: web.Request) -> web.Response:
        wanted = orjson.loads(await request.read())
        simulator.set_limits(wanted.get("requests_per_minute"), wanted.get("tokens_per_minute"))
        return web.Response(body=_EMPTY, content_type="application/json")

    async def reset(_: web.Request) -> web.Response:
        simulator.reset()
        return web.Response(body=_EMPTY, content_type="application/json")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", simulator.handle)
    app.router.add_post("/chat/completions", simulator.handle)
    app.router.add_get("/sim/stats", stats)
    app.router.add_post("/sim/reset", reset)
    app.router.add_post("/sim/limits", set_limits)
    if simulator.settings.batch_api:
        simulator.batches.register(app)
    return app
