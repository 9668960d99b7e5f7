"""Every daemon's HTTP server: an aiohttp `web.Application` served by `connection.py`'s sans-IO
HTTP/1.1 connection on asyncio (uvloop's or the standard loop), without aiohttp's server.

What it takes from the application: its router's routes (resolved as aiohttp resolves them: an
index by path prefix, walked from the request's whole path down; plain paths exactly, dynamic
ones by their regex against the path decoded but for %2F and %25; 404, or 405 with `Allow`,
raised through the middlewares as aiohttp does), its middlewares (new-style,
`middleware(request, handler)`), its keys, its `client_max_size` (the body limit) and its
startup/shutdown/cleanup hooks. Handlers get a `Request` (below: what a handler reads from a
`web.Request`) and return a `web.Response` whose body is bytes; a `web.HTTPException` raised
by a handler or a middleware is answered as aiohttp answers it. Not served: `StreamResponse`
and `FileResponse`, payload bodies, compression, cookies set on a response, sub-applications,
static routes, websockets (and any protocol upgrade), an access log.

One task per connection (started at its first request) runs its requests one after the other,
in the order received; pipelined requests wait, and reading pauses past `MAX_PIPELINED`. One
timer per server, every second, closes connections idle for `keepalive_timeout` (75 s, as
aiohttp) and those whose request has been arriving for longer than `request_timeout` (30 s:
headers and body; slow clients). Past `max_connections`, a new connection is closed at once.
`close()` stops listening, lets the requests received finish (up to `shutdown_timeout`), then
closes every connection and runs the application's shutdown and cleanup hooks. TLS is
asyncio's: an `ssl.SSLContext` given to `start`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

from aiohttp import web
from multidict import CIMultiDictProxy, MultiDict, MultiDictProxy

from lunastor.common.http.connection import Limits, ServerConnection
from lunastor.common.http.connection import Request as Message
from lunastor.common.logs import get_logger

KEEPALIVE_TIMEOUT = 75.0
REQUEST_TIMEOUT = 30.0
MAX_CONNECTIONS = 1024
SHUTDOWN_TIMEOUT = 10.0
MAX_PIPELINED = 8
SWEEP_INTERVAL = 1.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = get_logger(component="http")
_EMPTY_QUERY: MultiDictProxy[str] = MultiDictProxy(MultiDict())
_SAFE = re.compile("(%2[fF]|%25)")


def path_safe(raw: str) -> str:
    """`raw` percent-decoded except %2F and %25 (what aiohttp's routes match against)."""
    if "%" not in raw:
        return raw
    parts = _SAFE.split(raw)
    return "".join(p.upper() if i % 2 else unquote(p) for i, p in enumerate(parts))


def _unquote_safe(value: str) -> str:
    if "%" not in value:
        return value
    return value.replace("%2F", "/").replace("%25", "%")


class _NoRoute:
    """The route of a request no route matched (aiohttp's SystemRoute: no resource)."""

    resource = None


NO_ROUTE = _NoRoute()


class MatchInfo(dict[str, str]):
    """The path parameters, and the aiohttp route matched (`.route.resource.canonical`), as
    aiohttp's `UrlMappingMatchInfo`."""

    __slots__ = ("route",)

    def __init__(self, params: dict[str, str], route: Any) -> None:
        super().__init__(params)
        self.route = route


class Request(dict[Any, Any]):
    """What handlers read from a `web.Request`: app, method, path (decoded), raw_path (as
    sent, with the query), query_string, query, headers, match_info, remote, read/text/json;
    the request keys (`web.RequestKey`) are its items, as a `web.Request` is a mapping."""

    __slots__ = (
        "_body",
        "_query",
        "app",
        "headers",
        "match_info",
        "method",
        "path",
        "query_string",
        "raw_path",
        "remote",
        "version",
    )

    def __init__(
        self, app: web.Application, message: Message, match_info: MatchInfo, remote: str | None
    ) -> None:
        super().__init__()
        self.app = app
        self.method = message.method
        self.path = unquote(message.path) if "%" in message.path else message.path
        self.raw_path = message.target
        self.query_string = message.query_string
        self.headers = CIMultiDictProxy(message.headers)
        self.version = message.version
        self.match_info = match_info
        self.remote = remote
        self._body = message.body
        self._query: MultiDictProxy[str] | None = None

    @property
    def query(self) -> MultiDictProxy[str]:
        if self._query is None:
            if not self.query_string:
                self._query = _EMPTY_QUERY
            else:
                pairs = parse_qsl(self.query_string, keep_blank_values=True)
                self._query = MultiDictProxy(MultiDict(pairs))
        return self._query

    async def read(self) -> bytes:
        return self._body

    async def text(self) -> str:
        return self._body.decode("utf-8")

    async def json(self) -> Any:
        return json.loads(self._body)


class _Resource:
    """One aiohttp resource: how it matches a path, and its routes by method."""

    __slots__ = ("allowed", "any_route", "path", "pattern", "routes")

    def __init__(self, resource: web.AbstractResource) -> None:
        info = resource.get_info()
        self.path: str | None = info.get("path")
        self.pattern: re.Pattern[str] | None = info.get("pattern")
        if self.path is None and self.pattern is None:
            raise TypeError(f"{type(resource).__name__} {resource.canonical} is not served")
        self.routes: dict[str, web.AbstractRoute] = {}
        for route in resource:
            self.routes[route.method] = route
        self.any_route = self.routes.get("*")
        self.allowed = set(self.routes)

    def match(self, path: str) -> dict[str, str] | None:
        if self.path is not None:
            return {} if path == self.path else None
        assert self.pattern is not None
        m = self.pattern.fullmatch(path)
        if m is None:
            return None
        return {k: _unquote_safe(v) for k, v in m.groupdict().items()}


class Router:
    """An aiohttp application's routes, resolved as `UrlDispatcher.resolve` does."""

    def __init__(self, app: web.Application) -> None:
        self.index: dict[str, list[_Resource]] = {}
        for resource in app.router.resources():
            key = resource.canonical
            if "{" in key:
                key = key.partition("{")[0].rpartition("/")[0]
            self.index.setdefault(key.rstrip("/") or "/", []).append(_Resource(resource))

    def resolve(self, method: str, path: str) -> tuple[Any, dict[str, str], set[str]]:
        """(the route, its parameters, and when no route: the methods the path allows)."""
        allowed: set[str] = set()
        part = path
        while part:
            for res in self.index.get(part, ()):
                params = res.match(path)
                if params is None:
                    continue
                route = res.routes.get(method, res.any_route)
                if route is not None:
                    return route, params, allowed
                allowed |= res.allowed
            if part == "/":
                break
            part = part.rpartition("/")[0] or "/"
        return None, {}, allowed


def _chain(handler: Handler, middlewares: tuple[Any, ...]) -> Handler:
    for middleware in reversed(middlewares):
        handler = functools.partial(middleware, handler=handler)
    return handler


class HttpServer:
    """Serves `app` (see the module's docstring): `start`, then `close`."""

    def __init__(
        self,
        app: web.Application,
        *,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT,
        limits: Limits | None = None,
    ) -> None:
        self.app = app
        body_limit = getattr(app, "_client_max_size", Limits.max_body)
        self.limits = limits or Limits(max_body=body_limit)
        self.keepalive_timeout = keepalive_timeout
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.shutdown_timeout = shutdown_timeout
        self.connections: set[HttpProtocol] = set()
        self.closing = False
        self._router: Router | None = None
        self._chains: dict[int, Handler] = {}
        self._middlewares: tuple[Any, ...] = ()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(
        self, host: str | None, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """Run the application's startup hooks and listen; OSError if the bind fails."""
        self._loop = loop = asyncio.get_running_loop()
        self.app.freeze()
        self._router = Router(self.app)
        self._middlewares = tuple(self.app.middlewares)
        for route in self.app.router.routes():
            self._chains[id(route)] = _chain(route.handler, self._middlewares)
        await self.app.startup()
        try:
            self._server = await loop.create_server(
                lambda: HttpProtocol(self), host, port, reuse_address=True, ssl=ssl_context
            )
        except OSError:
            await self.app.shutdown()
            await self.app.cleanup()
            raise
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)

    @property
    def port(self) -> int:
        """The port listened on (the one asked for, or the kernel's choice for 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def _sweep(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        for protocol in list(self.connections):
            protocol.sweep(now)
        self._sweeper = self._loop.call_later(SWEEP_INTERVAL, self._sweep)

    async def dispatch(self, message: Message, remote: str | None) -> web.StreamResponse:
        """`message` through the middlewares and its route's handler: the response."""
        assert self._router is not None
        route, params, allowed = self._router.resolve(message.method, path_safe(message.path))
        if route is None:
            route = NO_ROUTE
            chain = _chain(_raiser(message.method, allowed), self._middlewares)
        else:
            chain = self._chains[id(route)]
        if message.too_large:
            chain = _chain(_too_large(self.limits.max_body), self._middlewares)
        request = Request(self.app, message, MatchInfo(params, route), remote)
        try:
            return await chain(cast(web.Request, request))
        except web.HTTPException as exc:  # a web.Response too (aiohttp 3)
            return exc
        except Exception:
            log.exception("unexpected error", method=message.method, path=message.path)
            return web.Response(
                status=500, text="500 Internal Server Error\n\nServer got itself in trouble"
            )  # as aiohttp's

    async def close(self) -> None:
        """Stop listening, let the requests received finish (up to `shutdown_timeout`),
        close every connection, then the application's shutdown and cleanup hooks."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        tasks = [t for p in list(self.connections) if (t := p.shut_down()) is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.shutdown_timeout)
            for task in pending:
                task.cancel()
        for protocol in list(self.connections):
            protocol.abort()
        if self._server is not None:
            await self._server.wait_closed()
        await self.app.shutdown()
        await self.app.cleanup()


def _raiser(method: str, allowed: set[str]) -> Handler:
    """The handler of a request no route matched: 405 with Allow, or 404 (as aiohttp)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if allowed:
            raise web.HTTPMethodNotAllowed(method, allowed)
        raise web.HTTPNotFound()

    return handler


def _too_large(limit: int) -> Handler:
    """The handler of a request whose body passed the limit (aiohttp's `read()` raises so)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=limit + 1)

    return handler


def _answer(response: web.StreamResponse) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """(status, reason, headers, body) of a `web.Response` with a bytes body; TypeError for
    what is not served."""
    if not isinstance(response, web.Response):
        raise TypeError(f"{type(response).__name__} is not served (web.Response only)")
    body = response.body
    if body is None:
        body = b""
    elif not isinstance(body, bytes | bytearray):
        raise TypeError(f"a body of type {type(body).__name__} is not served (bytes only)")
    return response.status, response.reason, list(response.headers.items()), bytes(body)


class HttpProtocol(asyncio.Protocol):
    """One connection: bytes to `ServerConnection`, its requests to `HttpServer.dispatch`."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._conn = ServerConnection(server.limits)
        assert server._loop is not None
        self._loop = server._loop
        # uvloop's transports are not asyncio.Transport subclasses: typed, never checked
        self._transport: asyncio.Transport | None = None
        self._remote: str | None = None
        self._tls = False
        self._queue: collections.deque[Message] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._reading_paused = False
        self.busy = False  # a request in its handler
        self.last_active = self._loop.time()
        self.request_started: float | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        if server.closing or len(server.connections) >= server.max_connections:
            transport.close()
            return
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._remote = str(peer[0]) if isinstance(peer, tuple) else None
        self._tls = transport.get_extra_info("sslcontext") is not None
        server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._queue.clear()
        self._server.connections.discard(self)
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None:
            if not self._writable.done():
                self._writable.set_result(None)
            self._writable = None

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        conn = self._conn
        requests = conn.receive(data)
        out = conn.data_to_send()
        if out:
            transport.write(out)
        if conn.receiving:
            if self.request_started is None:
                self.request_started = self._loop.time()
        else:
            self.request_started = None
        if requests:
            self._queue.extend(requests)
            if self._task is None:
                self._task = self._loop.create_task(self._serve())
            else:
                self._wake()
            if len(self._queue) >= MAX_PIPELINED and not self._reading_paused:
                self._reading_paused = True
                transport.pause_reading()
        elif conn.done and not self.busy and not self._queue:
            transport.close()

    def eof_received(self) -> bool | None:
        """The peer sent all it will (a half-close): the requests received are still answered,
        then the connection closes; with none owed, at once."""
        self._conn.close()
        if self.busy or self._queue:
            # keep our side open for the answers (asyncio's TLS transports cannot, and say so)
            return self._transport is not None and not self._tls
        return None

    # -- requests

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _serve(self) -> None:
        """The connection's requests, one after the other, until it closes."""
        try:
            await self._serve_requests()
        finally:  # closed however the loop ends (a bug of ours included: no connection left)
            if self._transport is not None:
                self._transport.close()

    async def _serve_requests(self) -> None:
        conn = self._conn
        while self._transport is not None:
            if not self._queue:
                if conn.done:
                    return
                self._waiter = self._loop.create_future()
                await self._waiter
                self._waiter = None
                continue
            if self._writable is not None:
                await self._writable
            message = self._queue.popleft()
            if self._reading_paused and len(self._queue) < MAX_PIPELINED:
                self._reading_paused = False
                if self._transport is not None:
                    self._transport.resume_reading()
            self.busy = True
            try:
                response = await self._server.dispatch(message, self._remote)
                try:
                    status, reason, headers, body = _answer(response)
                except TypeError:
                    log.exception("unserved response", path=message.path)
                    status, reason, headers, body = 500, "Internal Server Error", [], b""
            finally:
                self.busy = False
            self.last_active = self._loop.time()
            if self._transport is None:
                return
            conn.respond(status, headers, body, reason, head=message.method == "HEAD")
            self._transport.write(conn.data_to_send())

    # -- timers and shutdown

    def sweep(self, now: float) -> None:
        """Close the connection if idle too long or its request arrives too slowly."""
        transport = self._transport
        if transport is None or self.busy or self._queue:
            return
        started = self.request_started
        if started is not None:
            if now - started > self._server.request_timeout:
                transport.close()
        elif now - self.last_active > self._server.keepalive_timeout:
            transport.close()

    def shut_down(self) -> asyncio.Task[None] | None:
        """Read nothing more: the requests received are answered, the last with `Connection:
        close`, then the connection closes; the task to wait for, if any."""
        self._conn.close()
        if self._transport is not None and not self.busy and not self._queue:
            self._transport.close()
            return None
        self._wake()
        return self._task

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
