"""`GET /v1/volumes/{id}/metrics`: a volume's IO counters, added up over every access point.

Meta keeps no metrics of its own for this: it reads each live chunk server's `/metrics` (the
`admin_address` of its live record) at the time of the call, keeps the volume's series
(`lunastor.common.volume_io.parse`) and sums them. The answer is cumulative (commands, bytes,
summed latency, histogram buckets) with the time it was read; a client takes rates from two
answers. A server that does not answer in `FETCH_TIMEOUT` is listed as unreachable and left
out of the sums, so a rate across that gap is wrong for one interval, which the dashboard
shows by the gap it leaves.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from lunastor.common.records import ChunkServerStatus, Keys, RecordError
from lunastor.common.volume_io import IoTotals, parse
from lunastor.meta.context import ETCD_KEY
from lunastor.meta.problems import Problem
from lunastor.meta.routing import ALL_ROLES, Call, Route, json_response
from lunastor.meta.volumes import VOLUME_ID

FETCH_TIMEOUT = 2.0  # seconds per chunk server


async def _scrape(
    session: aiohttp.ClientSession, server: ChunkServerStatus, volume: str
) -> tuple[dict[str, object], IoTotals | None]:
    where: dict[str, object] = {"chunk_id": server.id, "admin_address": server.admin_address}
    try:
        async with session.get(f"http://{server.admin_address}/metrics") as resp:
            if resp.status != 200:
                raise aiohttp.ClientError(f"HTTP {resp.status}")
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return {**where, "reachable": False, "error": str(exc) or type(exc).__name__}, None
    totals = parse(text, volume)
    ops = {
        op: {"ops": t.ops, "bytes": t.bytes, "throttled_seconds": t.throttled_seconds}
        for op, t in totals.ops.items()
    }
    return {**where, "reachable": True, **ops}, totals


async def get_volume_metrics(call: Call) -> web.Response:
    etcd = call.app[ETCD_KEY]
    volume_id = call.params["volume_id"]
    if await etcd.get(Keys.volume(volume_id)) is None:
        raise Problem(404, "volume_not_found", f"no volume {volume_id}")
    lives, _ = await etcd.get_prefix(Keys.LIVE_CHUNKS)
    servers = []
    for kv in lives:
        try:
            status = ChunkServerStatus.from_json(kv.value)
        except RecordError:
            continue
        if status.admin_address:
            servers.append(status)
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        read_at = time.time()
        results = await asyncio.gather(
            *(_scrape(session, s, volume_id) for s in sorted(servers, key=lambda s: s.id))
        )
    total = IoTotals()
    for _, totals in results:
        if totals is not None:
            total.add(totals)
    return json_response(
        {
            "volume_id": volume_id,
            "at": read_at,
            **total.view(),
            "access_points": [where for where, _ in results],
        }
    )


ROUTES = [
    Route(
        "GET",
        "/v1/volumes/{volume_id}/metrics",
        get_volume_metrics,
        "getVolumeMetrics",
        "A volume's IO counters (commands, bytes, latency histogram) summed over the access "
        "points, read from their /metrics now; rates are differences between two readings",
        "volumes",
        ALL_ROLES,
        params=(VOLUME_ID,),
        responses={200: "VolumeMetrics"},
    ),
]
