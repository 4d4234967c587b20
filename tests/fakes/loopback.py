"""What every test double shares: an aiohttp app on 127.0.0.1 that can be stopped and started again."""

from __future__ import annotations

import asyncio
from typing import Self

from aiohttp import web


class LoopbackServer:
    """Serves `make_app()` on 127.0.0.1: a free port the first time, the same one after a `stop()`."""

    def __init__(self, *, port: int = 0) -> None:
        self.port = port
        self._runner: web.AppRunner | None = None

    def make_app(self) -> web.Application:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        """Closes the listener and every connection (clients then get "connection refused"); idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            # A few turns of the loop let in-process clients see their pooled connections closed, so
            # their next request meets the closed listener instead of a dead keep-alive socket.
            for _ in range(3):
                await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
