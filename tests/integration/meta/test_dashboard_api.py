"""The REST views the dashboard is built on, against a real etcd (in-process meta): volume
status and health, sessions, extent placement, the event log, the per-volume metrics summed
from real /metrics pages, whoami, and the static files at /ui."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import generate_latest

from lunastor.common.etcd import Etcd
from lunastor.common.events import KEEP, EventLog, prune, recent
from lunastor.common.records import (
    ChunkServerInfo,
    ChunkServerStatus,
    ExtentRecord,
    Keys,
    MetaInstance,
    OperationRecord,
    RedirectorInstance,
    ScrubErrorsRecord,
)
from lunastor.common.volume_io import VolumeIo
from lunastor.meta.events import PresenceEvents
from tests.integration.meta.conftest import TOKENS, Api, register_chunk
from tests.support.http import serving
from tests.support.procs import free_port

NODE = "iqn.2026-11.org.example:node1"


async def put_extent(etcd: Etcd, volume: str, index: int, *members: str, **kw: Any) -> None:
    rec = ExtentRecord(volume=volume, index=index, replicas=list(members), **kw)
    await etcd.put(Keys.extent(volume, index), rec.to_json())


async def test_volume_status_shows_health_sessions_and_placement(api: Api) -> None:
    for c in ("chunk-00000000000a", "chunk-00000000000b", "chunk-00000000000c"):
        await register_chunk(api.etcd, c, zone=c[-1])
    await register_chunk(api.etcd, "chunk-00000000000d", zone="d", up=False)
    a, b, c, d = (f"chunk-00000000000{x}" for x in "abcd")
    healthy = await api.volume("healthy")
    hurt = await api.volume("hurt")
    blank = await api.volume("blank")
    await put_extent(api.etcd, healthy["id"], 0, a, b, c)
    await put_extent(api.etcd, hurt["id"], 0, a, b, c)
    await put_extent(api.etcd, hurt["id"], 1, a, b, d)  # d is down and still a member
    await put_extent(api.etcd, hurt["id"], 2, d)  # nobody alive holds it
    await put_extent(api.etcd, f"{healthy['id']}.e1", 0, d)  # a snapshot's copy: not counted
    await api.ok("POST", f"/v1/volumes/{healthy['id']}/exports", {"initiator": NODE}, 201)
    # a live iSCSI session of the node at access point b, and one of an initiator not exported
    target = healthy["target_iqn"]
    await api.etcd.put(Keys.nexus_epoch(f"{NODE},i,0x23d000001", target), b.encode())
    await api.etcd.put(Keys.nexus_epoch("iqn.2026-11.org.example:other,i,0x1", target), a.encode())

    listed = await api.ok("GET", "/v1/volume-status")
    by_id = {item["volume_id"]: item for item in listed["items"]}
    assert by_id[healthy["id"]] == {
        "volume_id": healthy["id"],
        "health": "ok",
        "health_detail": "all 1 extents fully replicated",
        "extents": 1,
        "extents_by_health": {},
        "served_by": [b],
        "exports": 1,
    }
    assert by_id[hurt["id"]]["health"] == "unavailable"
    assert by_id[hurt["id"]]["extents_by_health"] == {"degraded": 1, "unavailable": 1}
    assert by_id[blank["id"]]["health"] == "ok" and by_id[blank["id"]]["served_by"] == []

    one = await api.ok("GET", f"/v1/volumes/{hurt['id']}/status")
    assert one["health"] == "unavailable" and one["served_by"] == [] and one["exports"] == 0
    assert [(e["index"], e["health"]) for e in one["extent_map"]] == [
        (0, "ok"),
        (1, "degraded"),
        (2, "unavailable"),
    ]
    assert one["extent_map"][1]["replicas"] == [
        {"chunk_id": a, "state": "up", "zone": "a"},
        {"chunk_id": b, "state": "up", "zone": "b"},
        {"chunk_id": d, "state": "down", "zone": "d"},
    ]
    served = await api.ok("GET", f"/v1/volumes/{healthy['id']}/status")
    assert served["served_by"] == [{"chunk_id": b, "initiator": NODE}]

    got, problem = await api.call("GET", "/v1/volumes/vol-0000000000000000/status")
    assert (got, problem["code"]) == (404, "volume_not_found")
    assert served["scrub_errors"] == 0


async def test_volume_status_counts_blocks_scrub_could_not_repair(api: Api) -> None:
    a, b, c = (f"chunk-00000000002{x}" for x in "abc")
    for x in (a, b, c):
        await register_chunk(api.etcd, x)
    vol = await api.volume("scrubbed")
    other = await api.volume("other")
    await put_extent(api.etcd, vol["id"], 0, a, b)
    await put_extent(api.etcd, vol["id"], 1, a, b)
    found = {
        a: [[vol["id"], 0, 5], [vol["id"], 1, 9], [other["id"], 0, 1]],
        b: [[vol["id"], 0, 5]],
        c: [[vol["id"], 1, 3]],  # c left extent 1 since: its bad copy no longer counts
    }
    for chunk, bad in found.items():
        rec = ScrubErrorsRecord(chunk_id=chunk, at=time.time(), blocks=bad)
        await api.etcd.put(Keys.scrub_errors(chunk), rec.to_json())
    status = await api.ok("GET", f"/v1/volumes/{vol['id']}/status")
    assert status["scrub_errors"] == 3
    await api.etcd.delete(Keys.scrub_errors(a))  # a's next pass found them good
    status = await api.ok("GET", f"/v1/volumes/{vol['id']}/status")
    assert status["scrub_errors"] == 1


async def test_a_lost_server_within_replace_after_is_waited_for(api: Api) -> None:
    a, b, c, d = (f"chunk-00000000001{x}" for x in "abcd")
    for x in (a, b, c):
        await register_chunk(api.etcd, x)
    status = ChunkServerStatus(id=a, zone="z1", replace_after=30.0)
    await api.etcd.put(Keys.live_chunk(a), status.to_json())
    await register_chunk(api.etcd, d, up=False)
    vol = await api.volume("waits")
    await put_extent(api.etcd, vol["id"], 0, a, b)  # d was dropped (a failover, say)
    op = OperationRecord(
        id="op-00000000000000d1", kind="rebuild", subject=d, created_at=time.time()
    )
    await api.etcd.put(Keys.operation(op.id), op.to_json())
    waiting = await api.ok("GET", f"/v1/volumes/{vol['id']}/status")
    assert waiting["health"] == "degraded"
    assert f"waiting for {d} to come back" in waiting["health_detail"]
    op.created_at -= 31.0  # replace_after is over: the primary joins c now
    await api.etcd.put(Keys.operation(op.id), op.to_json())
    rebuilding = await api.ok("GET", f"/v1/volumes/{vol['id']}/status")
    assert rebuilding["health"] == "rebuilding"


async def test_whoami_says_the_role_and_what_it_may_call(api: Api) -> None:
    admin = await api.ok("GET", "/v1/whoami")
    assert admin["role"] == "admin" and "drainChunkServer" in admin["may"]
    got, csi = await api.call("GET", "/v1/whoami", role="csi")
    assert csi["role"] == "csi" and "createVolume" in csi["may"]
    assert "drainChunkServer" not in csi["may"]
    got, reader = await api.call("GET", "/v1/whoami", role="reader")
    assert reader["role"] == "reader"
    assert "createVolume" not in reader["may"] and "listVolumes" in reader["may"]
    got, problem = await api.call("GET", "/v1/whoami", role=None)
    assert (got, problem["code"]) == (401, "unauthenticated")


async def test_the_dashboard_files_need_no_token_and_hold_no_data(api: Api) -> None:
    resp = await api.client.get("/ui", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/ui/"
    page = await api.client.get("/ui/")
    assert page.status == 200 and page.content_type == "text/html"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    html = await page.text()
    assert 'type="module" src="app.js"' in html and TOKENS["admin"] not in html
    js = await api.client.get("/ui/views/volume.js")
    assert js.status == 200 and js.content_type == "text/javascript"
    assert (await api.client.get("/ui/nothing.js")).status == 404
    # a path that climbs out of /ui/ reaches no file (sent as is: clients would normalise it)
    for path in ("/ui/../../pyproject.toml", "/ui/%2e%2e/%2e%2e/pyproject.toml", "/ui//etc/passwd"):
        reader, writer = await asyncio.open_connection(api.client.host, api.client.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status_line = (await reader.readline()).decode()
        writer.close()
        assert status_line.split()[1] in ("404", "401"), (path, status_line)
    # the API behind it still wants a token
    assert (await api.client.get("/v1/volumes")).status == 401


@pytest.fixture
async def events(api: Api) -> AsyncIterator[EventLog]:
    log = EventLog()
    log.bind(api.etcd, "test-source")
    yield log
    await log.unbind()


async def test_events_are_listed_newest_first_and_pruned(api: Api, events: EventLog) -> None:
    for i in range(5):
        await events.write("replica_removed", f"vol-x/{i}", f"chunk-{i}")
    events.emit("failover", "vol-x/9", "a -> b")  # in the background
    await events.unbind()
    listed = await api.ok("GET", "/v1/events?limit=3")
    assert [e["subject"] for e in listed["items"]] == ["vol-x/9", "vol-x/4", "vol-x/3"]
    newest = listed["items"][0]
    assert newest["kind"] == "failover" and newest["severity"] == "warning"
    assert newest["source"] == "test-source" and newest["what"].startswith("an extent got")
    got, problem = await api.call("GET", f"/v1/events?limit={KEEP + 1}")
    assert (got, problem["code"]) == (400, "invalid_field")
    assert await prune(api.etcd, keep=2) == 4
    assert [e["subject"] for e in await recent(api.etcd, 10)] == ["vol-x/9", "vol-x/4"]


async def test_an_unbound_log_and_a_burst_write_nothing_beyond_their_bounds(api: Api) -> None:
    log = EventLog(rate=0.0, burst=2)
    log.emit("failover", "x/0", "")  # not bound: dropped
    log.bind(api.etcd, "burst")
    for i in range(5):
        log.emit("failover", f"x/{i}", "")
    await log.unbind()
    assert [e["subject"] for e in await recent(api.etcd, 10)] == ["x/1", "x/0"]


async def test_presence_events_report_what_changed_between_passes(
    api: Api, events: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lunastor.meta.events.EVENTS", events)
    etcd = api.etcd
    await register_chunk(etcd, "chunk-0000000000a1")
    await register_chunk(etcd, "chunk-0000000000a2")
    await etcd.put(Keys.LIVE_META + "m1", MetaInstance(id="m1").to_json())
    await etcd.put(Keys.REDIRECTOR_ELECTION + "/r1", b"r1")
    watcher = PresenceEvents(etcd)
    await watcher.run_once()  # the first pass only looks
    assert await recent(etcd, 10) == []
    await etcd.delete(Keys.live_chunk("chunk-0000000000a2"))
    await register_chunk(etcd, "chunk-0000000000a3")
    await etcd.delete(Keys.REDIRECTOR_ELECTION + "/r1")
    await etcd.put(Keys.REDIRECTOR_ELECTION + "/r2", b"r2")
    vip = RedirectorInstance(id="r2", vip="10.0.0.100:3260")
    await etcd.put(Keys.LIVE_REDIRECTORS + "r2", vip.to_json())
    await watcher.run_once()
    got = {(e["kind"], e["subject"], e["detail"]) for e in await recent(etcd, 10)}
    portal = ChunkServerInfo.from_json(
        (await etcd.get(Keys.chunk("chunk-0000000000a2"))).value  # type: ignore[union-attr]
    ).portal
    assert got == {
        ("chunk_server_down", "chunk-0000000000a2", f"zone z1, portal {portal}"),
        ("chunk_server_joined", "chunk-0000000000a3", ""),
        ("redirector_failover", "r2", "VIP 10.0.0.100:3260 (was r1)"),
    }


async def test_volume_metrics_are_summed_over_the_access_points(api: Api) -> None:
    vol = await api.volume("measured")
    io = VolumeIo(vol["id"])
    for _ in range(3):
        await io.timed("read", 4096, _done())
    await io.timed("write", 65536, _done())

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    try:
        async with serving(app) as server:
            port = server.port
            # two access points serving this process's metrics, one that does not answer
            for cid, address in (
                ("chunk-0000000000b1", f"127.0.0.1:{port}"),
                ("chunk-0000000000b2", f"127.0.0.1:{port}"),
                ("chunk-0000000000b3", f"127.0.0.1:{free_port()}"),
            ):
                status = ChunkServerStatus(id=cid, admin_address=address)
                await api.etcd.put(Keys.live_chunk(cid), status.to_json())
            before = time.time()
            m = await api.ok("GET", f"/v1/volumes/{vol['id']}/metrics")
    finally:
        io.forget()
    assert m["at"] >= before
    assert (m["read"]["ops"], m["read"]["bytes"]) == (6, 6 * 4096)
    assert (m["write"]["ops"], m["write"]["bytes"]) == (2, 2 * 65536)
    assert m["read"]["buckets"][-1] == [10.0, 6]
    points = {p["chunk_id"]: p for p in m["access_points"]}
    assert points["chunk-0000000000b1"]["reachable"] and points["chunk-0000000000b1"]["read"] == {
        "ops": 3,
        "bytes": 3 * 4096,
        "throttled_seconds": 0,  # no QoS limits on this volume (docs/qos.md)
    }
    assert not points["chunk-0000000000b3"]["reachable"] and points["chunk-0000000000b3"]["error"]
    got, problem = await api.call("GET", "/v1/volumes/vol-0000000000000000/metrics")
    assert (got, problem["code"]) == (404, "volume_not_found")


async def _done() -> None:
    return None
