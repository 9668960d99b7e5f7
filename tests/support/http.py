"""An aiohttp application served in-process by lunastor's HTTP server (common/http), as the
daemons serve theirs: for aiohttp's `TestClient`, or as a plain URL."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.test_utils import BaseTestServer
from yarl import URL

from lunastor.common.http.server import HttpServer


class ServedApp(BaseTestServer):
    """`app` on 127.0.0.1 (a port of the kernel's choice) behind `HttpServer`, for
    `TestClient(ServedApp(app))`; `server_options` go to `HttpServer`."""

    def __init__(self, app: web.Application, **server_options: Any) -> None:
        super().__init__(scheme="http")
        self.app = app
        self.server: HttpServer | None = None
        self._options = server_options

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        raise NotImplementedError("served by HttpServer, not by an aiohttp runner")

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        if self.server is not None:
            return
        self.server = HttpServer(self.app, **self._options)
        await self.server.start(self.host, 0, kwargs.get("ssl"))
        self.port = self.server.port
        self.scheme = "https" if kwargs.get("ssl") else "http"
        self._root = URL(f"{self.scheme}://{self.host}:{self.port}")

    @property
    def started(self) -> bool:
        return self.server is not None

    async def close(self) -> None:
        if self.server is not None and not self.closed:
            await self.server.close()
            self._root = None
            self._closed = True


@contextlib.asynccontextmanager
async def serving(app: web.Application, **server_options: Any) -> AsyncIterator[HttpServer]:
    """`app` served on 127.0.0.1 (`.port`) for the block, closed after it."""
    server = HttpServer(app, **server_options)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close()
