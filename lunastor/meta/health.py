"""`/v1/capacity`, `/v1/health` and `/v1/cluster`: views over the live records."""

from __future__ import annotations

from aiohttp import web

from lunastor.common.logs import get_logger
from lunastor.common.records import (
    ChunkServerInfo,
    ChunkServerStatus,
    Keys,
    MetaInstance,
    RecordError,
    RedirectorInstance,
    decode_records,
)
from lunastor.meta.cluster import cluster_view
from lunastor.meta.context import CLUSTER_STORE_KEY, ETCD_KEY
from lunastor.meta.routing import ALL_ROLES, Call, Param, Route, json_response

log = get_logger(component="api")

ZONE = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"}


async def get_capacity(call: Call) -> web.Response:
    store = call.app[CLUSTER_STORE_KEY]
    return json_response(await store.capacity(call.params.get("zone")))


async def get_health(call: Call) -> web.Response:
    return json_response(await call.app[CLUSTER_STORE_KEY].health())


def _skipped(key: str, exc: RecordError) -> None:
    log.warning("skipping undecodable record", key=key, error=str(exc))


async def get_cluster(call: Call) -> web.Response:
    etcd = call.app[ETCD_KEY]
    # One revision for the whole view, so it is a consistent snapshot.
    infos, rev = await etcd.get_prefix(Keys.CHUNKS)
    statuses, _ = await etcd.get_prefix(Keys.LIVE_CHUNKS, revision=rev)
    metas, _ = await etcd.get_prefix(Keys.LIVE_META, revision=rev)
    redirectors, _ = await etcd.get_prefix(Keys.LIVE_REDIRECTORS, revision=rev)
    candidates, _ = await etcd.get_prefix(Keys.REDIRECTOR_ELECTION + "/", revision=rev)
    leader = min(candidates, key=lambda kv: kv.create_revision, default=None)
    view = cluster_view(
        decode_records(infos, ChunkServerInfo, _skipped),
        decode_records(statuses, ChunkServerStatus, _skipped),
        decode_records(metas, MetaInstance, _skipped),
        decode_records(redirectors, RedirectorInstance, _skipped),
        leader.value.decode() if leader is not None else None,
    )
    view["revision"] = rev
    return json_response(view)


ROUTES = [
    Route(
        "GET",
        "/v1/capacity",
        get_capacity,
        "getCapacity",
        "Total and free bytes of the live chunk servers, per zone (CSI GetCapacity)",
        "cluster",
        ALL_ROLES,
        params=(Param("zone", "query", ZONE, "only this zone"),),
        responses={200: "Capacity"},
    ),
    Route(
        "GET",
        "/v1/health",
        get_health,
        "getHealth",
        "Cluster health: etcd, chunk servers up and down, meta instances, redirector leader",
        "cluster",
        ALL_ROLES,
        responses={200: "Health"},
    ),
    Route(
        "GET",
        "/v1/cluster",
        get_cluster,
        "getCluster",
        "Chunk servers, meta instances and redirectors, read at one etcd revision",
        "cluster",
        ALL_ROLES,
        responses={200: "Cluster"},
    ),
]
