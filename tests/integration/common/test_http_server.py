"""lunastor's HTTP server (common/http/server.py) on real sockets: aiohttp's client, and raw
sockets for what a well-behaved client never sends. The routing, middleware and error answers
are compared with aiohttp's own server serving the same application."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web

from lunastor.common.http.server import HttpServer
from tests.support.http import serving
from tests.support.tls import self_signed

SEEN = web.AppKey("seen", list)
TOKEN = web.RequestKey("token", str)


@web.middleware
async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """As meta's: reads the route's canonical path, sets a request key, and turns what it can
    into its own answers (others go on as raised)."""
    if request.headers.get("X-Refuse"):
        raise web.HTTPForbidden(text="refused by the middleware")
    request[TOKEN] = request.headers.get("Authorization", "")
    try:
        response = await handler(request)
    except web.HTTPNotFound:
        response = web.json_response({"problem": "not found"}, status=404)
    resource = request.match_info.route.resource
    response.headers["X-Route"] = resource.canonical if resource is not None else "unmatched"
    return response


def make_app() -> web.Application:
    app = web.Application(middlewares=[middleware], client_max_size=1024)
    app[SEEN] = []

    async def hello(request: web.Request) -> web.Response:
        request.app[SEEN].append(request.path)
        return web.Response(text=f"hello {request.query.get('who', 'you')}")

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type="application/octet-stream")

    async def item(request: web.Request) -> web.Response:
        return web.json_response(
            {"id": request.match_info["id"], "token": request[TOKEN], "path": request.path}
        )

    async def file(request: web.Request) -> web.Response:
        return web.Response(text=request.match_info["name"])

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "0.3")))
        return web.Response(text=f"slow {request.query.get('n', '')}")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/hello")

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    async def stream(request: web.Request) -> web.StreamResponse:
        return web.StreamResponse()

    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=204)

    app.router.add_get("/hello", hello)
    app.router.add_post("/echo", echo)
    app.router.add_get("/items/{id}", item)
    app.router.add_delete("/items/{id}", item)
    app.router.add_get("/files/{name:.+}", file)
    app.router.add_get("/slow", slow)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/boom", boom)
    app.router.add_put("/empty", empty)
    app.router.add_get("/stream", stream)
    return app


@contextlib.asynccontextmanager
async def aiohttp_serving(app: web.Application) -> AsyncIterator[int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    async with serving(make_app()) as s:
        yield s


async def raw(port: int, data: bytes, read_until_close: bool = True) -> bytes:
    """Send `data` on a new connection; what comes back until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10) if read_until_close else b""
    finally:
        writer.close()


def responses(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in `data` (Content-Length framed)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        out.append((status, rest[:length]))
        data = rest[length:]
    return out


# -- the same answers as aiohttp's server

PARITY = [
    ("GET", "/hello?who=me", {}, b""),
    ("GET", "/hello", {"X-Refuse": "1"}, b""),  # an HTTPException from the middleware
    ("HEAD", "/hello", {}, b""),
    ("POST", "/hello", {}, b""),  # 405 with Allow
    ("GET", "/nowhere", {}, b""),  # 404 through the middleware
    ("GET", "/items/a%20b", {"Authorization": "t"}, b""),
    ("GET", "/items/a%2Fb", {}, b""),  # %2F stays in one parameter
    ("DELETE", "/items/x", {}, b""),
    ("PATCH", "/items/x", {}, b""),
    ("GET", "/files/a/b/c.txt", {}, b""),
    ("POST", "/echo", {}, b"some bytes"),
    ("POST", "/echo", {}, b"x" * 2000),  # over client_max_size
    ("GET", "/redirect", {}, b""),
    ("GET", "/boom", {}, b""),  # 500
    ("PUT", "/empty", {}, b""),
]
COMPARED = ("Content-Type", "Allow", "Location", "X-Route", "Content-Length")


async def answers(port: int) -> list[tuple[Any, ...]]:
    out = []
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
        for method, path, headers, body in PARITY:
            async with session.request(
                method, path, headers=headers, data=body or None, allow_redirects=False
            ) as resp:
                got = await resp.read()
                kept = tuple(resp.headers.get(h) for h in COMPARED)
                out.append((method, path, resp.status, resp.reason, kept, got))
    return out


async def test_answers_as_aiohttp_answers(server: HttpServer) -> None:
    async with aiohttp_serving(make_app()) as port:
        expected = await answers(port)
    got = await answers(server.port)
    for ours, theirs in zip(got, expected, strict=True):
        assert ours == theirs


# -- connections


async def test_keep_alive_one_connection_for_many_requests(server: HttpServer) -> None:
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}", connector=connector) as s:
        for i in range(5):
            async with s.get("/hello", params={"who": str(i)}) as resp:
                assert await resp.text() == f"hello {i}"
        assert len(server.connections) == 1


async def test_http_10_is_answered_and_closed(server: HttpServer) -> None:
    data = await raw(server.port, b"GET /hello HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close\r\n" in data
    assert responses(data) == [(200, b"hello you")]


async def test_pipelined_requests_are_answered_in_order(server: HttpServer) -> None:
    """The first takes longest; the answers still come in the order asked."""
    data = await raw(
        server.port,
        b"GET /slow?n=1&s=0.3 HTTP/1.1\r\n\r\n"
        b"GET /slow?n=2&s=0 HTTP/1.1\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    assert responses(data) == [
        (200, b"slow 1"),
        (200, b"slow 2"),
        (200, b"abc"),
        (200, b"hello you"),
    ]


async def test_half_closed_connection_gets_its_answers(server: HttpServer) -> None:
    """A client that shuts its sending side after its requests still gets every answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /slow?s=0.2&n=a HTTP/1.1\r\n\r\nGET /hello HTTP/1.1\r\n\r\n")
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5)
    assert responses(data) == [(200, b"slow a"), (200, b"hello you")]
    assert data.count(b"Connection: close\r\n") == 1
    writer.close()


async def test_chunked_upload(server: HttpServer) -> None:
    async def parts() -> AsyncIterator[bytes]:
        for part in (b"one ", b"two ", b"three"):
            yield part

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{server.port}/echo", data=parts()) as resp,
    ):
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        assert await resp.read() == b"one two three"


async def test_100_continue(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(b"hello")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert await reader.readexactly(5) == b"hello"
    writer.close()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{server.port}/echo", data=b"abc", expect100=True) as resp,
    ):
        assert await resp.read() == b"abc"


async def test_declared_body_over_the_limit_is_refused_at_once(server: HttpServer) -> None:
    """413 from the head alone (the body is never sent), raised through the middleware as
    aiohttp's `read()` raises it, and the connection closed."""
    data = await raw(server.port, b"POST /echo HTTP/1.1\r\nContent-Length: 10485760\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
    assert b"Connection: close\r\n" in data
    assert data.endswith(b"\r\n\r\nMaximum request body size 1024 exceeded.")


async def test_malformed_request_gets_400_and_close(server: HttpServer) -> None:
    data = await raw(server.port, b"GET /hello HTTP/1.1\r\n\r\nNOT HTTP\r\n\r\n")
    assert [s for s, _ in responses(data)] == [200, 400]
    assert data.endswith(b"malformed HTTP request: Invalid method encountered\n")


async def test_a_response_not_served_is_a_500_and_the_connection_goes_on(
    server: HttpServer,
) -> None:
    """Only `web.Response` bodies are served: a `StreamResponse` is a bug, answered 500."""
    data = await raw(
        server.port, b"GET /stream HTTP/1.1\r\n\r\nGET /hello HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    assert responses(data) == [(500, b""), (200, b"hello you")]


async def test_header_limits(server: HttpServer) -> None:
    long = await raw(server.port, b"GET /hello HTTP/1.1\r\nX-A: " + b"v" * 9000 + b"\r\n\r\n")
    assert long.startswith(b"HTTP/1.1 431 ")
    many = b"".join(b"X-%d: v\r\n" % i for i in range(200))
    assert (await raw(server.port, b"GET /hello HTTP/1.1\r\n" + many + b"\r\n")).startswith(
        b"HTTP/1.1 431 "
    )


async def test_slow_request_head_is_closed_at_its_deadline() -> None:
    async with serving(make_app(), request_timeout=0.5) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        start = time.monotonic()
        writer.write(b"GET /hello HTTP/1.1\r\n")  # and nothing more, ever
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.5 <= time.monotonic() - start < 3
        writer.close()


async def test_idle_connection_is_closed() -> None:
    async with serving(make_app(), keepalive_timeout=0.5) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /hello HTTP/1.1\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"hello you"), 5)
        start = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - start < 3
        assert not server.connections
        writer.close()


async def test_connections_past_the_limit_are_closed_at_once() -> None:
    async with serving(make_app(), max_connections=2) as server:
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, unanswered
        writer.close()
        for r, w in held:  # those within the limit are served
            w.write(b"GET /hello HTTP/1.1\r\n\r\n")
            await asyncio.wait_for(r.readuntil(b"hello you"), 5)
            w.close()


async def test_graceful_shutdown_finishes_requests_in_flight() -> None:
    server = HttpServer(make_app())
    await server.start("127.0.0.1", 0)
    port = server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow?s=0.5&n=last HTTP/1.1\r\n\r\n")
    await asyncio.sleep(0.1)
    closing = asyncio.create_task(server.close())
    data = await asyncio.wait_for(reader.read(), 5)
    assert responses(data) == [(200, b"slow last")] and b"Connection: close\r\n" in data
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""
    await closing
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    idle_writer.close()


def test_served_on_uvloop() -> None:
    """The daemons run on uvloop, whose transports are its own classes."""

    async def scenario() -> list[tuple[int, bytes]]:
        async with serving(make_app()) as server:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{server.port}/items/u") as resp,
            ):
                assert (await resp.json())["id"] == "u"
            return responses(
                await raw(
                    server.port,
                    b"GET /hello HTTP/1.1\r\n\r\nGET /hello?who=2 HTTP/1.1\r\nConnection: close"
                    b"\r\n\r\n",
                )
            )

    assert uvloop.run(scenario()) == [(200, b"hello you"), (200, b"hello 2")]


async def test_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server = HttpServer(make_app())
    await server.start("127.0.0.1", 0, server_context)
    try:
        client_context = ssl.create_default_context(cafile=str(cert))
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://127.0.0.1:{server.port}/hello", ssl=client_context) as resp,
        ):
            assert await resp.text() == "hello you"
    finally:
        await server.close()
