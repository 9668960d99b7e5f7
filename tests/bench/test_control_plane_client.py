"""The control-plane bench's light HTTP/1.1 client against a real aiohttp server (the library
meta answers with): it must read aiohttp's responses whole, keep one connection alive across
requests, and fail loudly on what it does not implement."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from bench.control_plane import TOKEN, HttpError, LightConnection, expect


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, int, list[web.Request]]]:
    seen: list[web.Request] = []
    peers: set[object] = set()

    async def create(request: web.Request) -> web.Response:
        seen.append(request)
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        body = await request.json()
        return web.json_response(
            {"id": "vol-1", "name": body["name"], "peers": len(peers)}, status=201
        )

    async def delete(request: web.Request) -> web.Response:
        seen.append(request)
        return web.Response(status=204)

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"{}")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/volumes", create)
    app.router.add_delete("/v1/volumes/{id}", delete)
    app.router.add_get("/chunked", chunked)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield "127.0.0.1", port, seen
    finally:
        await runner.cleanup()


async def test_requests_and_responses_on_one_connection(
    server: tuple[str, int, list[web.Request]],
) -> None:
    host, port, seen = server
    conn = LightConnection(host, port)
    try:
        for n in range(3):
            status, body = await conn.request("POST", "/v1/volumes", {"name": f"v{n}"})
            reply = json.loads(expect(status, body, 201))
            assert reply == {"id": "vol-1", "name": f"v{n}", "peers": 1}  # one keep-alive socket
            status, body = await conn.request("DELETE", "/v1/volumes/vol-1")
            assert expect(status, body, 204) == b""
    finally:
        conn.close()
    assert seen[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert seen[0].content_type == "application/json"


async def test_unexpected_status_and_unsupported_bodies_are_errors(
    server: tuple[str, int, list[web.Request]],
) -> None:
    host, port, _ = server
    conn = LightConnection(host, port)
    try:
        status, body = await conn.request("DELETE", "/v1/volumes/vol-1")
        with pytest.raises(HttpError, match="status 204, expected 201"):
            expect(status, body, 201)
        status, body = await conn.request("POST", "/nowhere", {})
        assert status == 404
        with pytest.raises(HttpError, match="Transfer-Encoding"):
            await conn.request("GET", "/chunked")
    finally:
        conn.close()
