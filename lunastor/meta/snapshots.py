"""`/v1/snapshots`: metadata-only copy-on-write snapshots, ready at once."""

from __future__ import annotations

from aiohttp import web

from lunastor.meta import schemas
from lunastor.meta.context import STORE_KEY
from lunastor.meta.routing import (
    ALL_ROLES,
    CSI_ROLES,
    Call,
    Param,
    Route,
    json_response,
    listing_response,
)
from lunastor.meta.store import snapshot_view

SNAPSHOT_ID = Param("snapshot_id", "path", schemas.snapshot_id, "snapshot id (snap-...)")


async def create_snapshot(call: Call) -> web.Response:
    store = call.app[STORE_KEY]
    snap, created = await store.create_snapshot(call.body["name"], call.body["volume_id"])
    return json_response(snapshot_view(snap), 201 if created else 200)


async def get_snapshot(call: Call) -> web.Response:
    snap = await call.app[STORE_KEY].get_snapshot(call.params["snapshot_id"])
    return json_response(snapshot_view(snap))


async def list_snapshots(call: Call) -> web.Response:
    store = call.app[STORE_KEY]
    name = call.params.get("name")
    if name is not None:
        found = await store.find_snapshot(name)
        volume_id = call.params.get("volume_id")
        if found is not None and volume_id is not None and found.source_volume_id != volume_id:
            found = None
        items = [snapshot_view(found)] if found is not None else []
        revision = await store.etcd.revision()
        return json_response({"items": items, "next": None, "revision": revision})
    limit = call.params.get("limit", schemas.LIST_LIMIT_DEFAULT)
    page = await store.list_snapshots(limit, call.params.get("next"), call.params.get("volume_id"))
    return listing_response(page)


async def delete_snapshot(call: Call) -> web.Response:
    await call.app[STORE_KEY].delete_snapshot(call.params["snapshot_id"])
    return web.Response(status=204)


ROUTES = [
    Route(
        "POST",
        "/v1/snapshots",
        create_snapshot,
        "createSnapshot",
        "Snapshot a volume (idempotent by name; CSI CreateSnapshot)",
        "snapshots",
        CSI_ROLES,
        body=schemas.SNAPSHOT_CREATE,
        responses={201: "Snapshot", 200: "Snapshot", 404: "Problem", 409: "Problem"},
    ),
    Route(
        "GET",
        "/v1/snapshots",
        list_snapshots,
        "listSnapshots",
        "List snapshots, paginated; filter by name or source volume (CSI ListSnapshots)",
        "snapshots",
        ALL_ROLES,
        params=(
            Param("limit", "query", schemas.LIMIT, "page size (default 100)"),
            Param("next", "query", schemas.NEXT, "token from the previous page"),
            Param("name", "query", schemas.name, "find the snapshot with this name"),
            Param("volume_id", "query", schemas.volume_id, "only snapshots of this volume"),
        ),
        responses={200: "SnapshotPage", 410: "Problem"},
    ),
    Route(
        "GET",
        "/v1/snapshots/{snapshot_id}",
        get_snapshot,
        "getSnapshot",
        "Get a snapshot",
        "snapshots",
        ALL_ROLES,
        params=(SNAPSHOT_ID,),
        responses={200: "Snapshot"},
    ),
    Route(
        "DELETE",
        "/v1/snapshots/{snapshot_id}",
        delete_snapshot,
        "deleteSnapshot",
        "Delete a snapshot; missing is fine (CSI DeleteSnapshot)",
        "snapshots",
        CSI_ROLES,
        params=(SNAPSHOT_ID,),
        responses={204: None, 409: "Problem"},
    ),
]
