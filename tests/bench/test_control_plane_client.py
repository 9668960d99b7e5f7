"""The control-plane bench's C client (bench/http_cycles.c) against a real aiohttp server (the
library meta answers with): it runs whole volume cycles over one keep-alive connection per
client, sends the requests aiohttp's client sends, and fails loudly on a status it does not
expect or a response it does not implement."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from bench import iscsi_load
from bench.control_plane import (
    HTTP_CYCLES,
    INITIATOR,
    TOKEN,
    HttpError,
    c_client_argv,
    c_cycles,
    request_headers,
)


@dataclass
class Seen:
    """What the test server was asked: each request's method, path, headers and body, and the
    connections they came on."""

    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    peers: set[object] = field(default_factory=set)
    volumes: dict[str, str] = field(default_factory=dict)  # id -> name, while it exists
    exports: dict[str, str] = field(default_factory=dict)  # id -> initiator
    fail_delete: bool = False
    chunked_create: bool = False


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Seen]]:
    seen = Seen()
    count = iter(range(1_000_000))

    async def note(request: web.Request) -> bytes:
        body = await request.read()
        seen.requests.append((request.method, request.path, dict(request.headers), body))
        assert request.transport is not None
        seen.peers.add(request.transport.get_extra_info("peername"))
        return body

    async def create(request: web.Request) -> web.StreamResponse:
        body = json.loads(await note(request))
        vid = f"vol-{next(count):016x}"
        seen.volumes[vid] = body["name"]
        if seen.chunked_create:
            resp = web.StreamResponse(status=201)
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(json.dumps({"id": vid}).encode())
            await resp.write_eof()
            return resp
        return web.json_response({"name": body["name"], "id": vid, "size_bytes": 1}, status=201)

    async def publish(request: web.Request) -> web.Response:
        body = json.loads(await note(request))
        seen.exports[request.match_info["id"]] = body["initiator"]
        return web.json_response({"initiator": body["initiator"]}, status=201)

    async def unpublish(request: web.Request) -> web.Response:
        await note(request)
        assert seen.exports.pop(request.match_info["id"]) == request.match_info["initiator"]
        return web.Response(status=204)

    async def healthz(request: web.Request) -> web.Response:
        await note(request)
        return web.Response(text="ok")

    async def delete(request: web.Request) -> web.Response:
        await note(request)
        if seen.fail_delete:
            return web.json_response({"title": "busy"}, status=409)
        del seen.volumes[request.match_info["id"]]
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/v1/volumes", create)
    app.router.add_post("/v1/volumes/{id}/exports", publish)
    app.router.add_delete("/v1/volumes/{id}/exports/{initiator}", unpublish)
    app.router.add_delete("/v1/volumes/{id}", delete)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


@pytest.fixture
def binary(tmp_path: Path) -> Path:
    return iscsi_load.build(tmp_path / "bin", HTTP_CYCLES)


async def test_cycles_on_one_connection_per_client(server: tuple[str, Seen], binary: Path) -> None:
    url, seen = server
    done = await c_cycles(binary, url, clients=3, ops=10, meta_pid=os.getpid())
    assert len(done.create_publish) == len(done.unpublish_delete) == 10
    assert all(0 < t < 10 for t in done.create_publish + done.unpublish_delete)
    assert done.elapsed > 0 and done.client_cpu >= 0
    assert len(seen.peers) == 3  # keep-alive: one connection per client, for every request
    # each connection answered once before the timed cycles
    assert [(m, p) for m, p, _, _ in seen.requests[:3]] == [("GET", "/healthz")] * 3
    assert seen.volumes == {} and seen.exports == {}  # every cycle deleted what it made
    names = sorted(json.loads(b)["name"] for m, p, _, b in seen.requests if p == "/v1/volumes")
    assert names == sorted(f"bench-3-{n}" for n in range(10))
    steps = [(m, p.count("/")) for m, p, _, _ in seen.requests[3:]]
    assert steps.count(("POST", 2)) == steps.count(("DELETE", 3)) == 10  # create, delete
    assert steps.count(("POST", 4)) == steps.count(("DELETE", 5)) == 10  # publish, unpublish
    initiators = {json.loads(b)["initiator"] for m, p, _, b in seen.requests if m == "POST" and
                  p.endswith("/exports")}  # fmt: skip
    assert initiators <= {f"{INITIATOR}{c}" for c in range(3)}


async def test_the_requests_are_aiohttps_byte_for_byte(
    server: tuple[str, Seen], binary: Path
) -> None:
    url, seen = server
    await c_cycles(binary, url, clients=1, ops=1, meta_pid=os.getpid())
    method, path, headers, body = seen.requests[1]  # after the warm-up GET
    assert (method, path) == ("POST", "/v1/volumes")
    assert body == json.dumps({"name": "bench-1-0", "size_bytes": 1 << 30}).encode()
    host = url.removeprefix("http://")
    assert list(headers.items()) == [
        ("Host", host),
        ("Authorization", f"Bearer {TOKEN}"),
        ("Accept", "*/*"),
        ("Accept-Encoding", "gzip, deflate"),
        ("User-Agent", headers["User-Agent"]),
        ("Content-Length", str(len(body))),
        ("Content-Type", "application/json"),
    ]
    assert "aiohttp/" in headers["User-Agent"]
    assert request_headers(*host.split(":")[:1], int(host.split(":")[1])).endswith(
        f"User-Agent: {headers['User-Agent']}\r\n"
    )
    _, _, bodyless, empty = seen.requests[3]  # the unpublish
    assert bodyless["Content-Length"] == "0" and empty == b""


async def test_an_unexpected_status_fails_the_run(server: tuple[str, Seen], binary: Path) -> None:
    url, seen = server
    seen.fail_delete = True
    with pytest.raises(HttpError, match="delete: status 409, expected 204"):
        await c_cycles(binary, url, clients=2, ops=4, meta_pid=os.getpid())


async def test_a_chunked_response_is_refused(server: tuple[str, Seen], binary: Path) -> None:
    url, seen = server
    seen.chunked_create = True
    with pytest.raises(HttpError, match="Transfer-Encoding"):
        await c_cycles(binary, url, clients=1, ops=1, meta_pid=os.getpid())


async def test_a_server_that_is_not_there_fails_the_run(binary: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        *c_client_argv(binary, "http://127.0.0.1:1", 1, 1), stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode == 1 and b"connect to 127.0.0.1:1" in err
