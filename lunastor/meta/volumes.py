"""`/v1/volumes`: create (idempotent by name), get, list, find by name, delete, expand."""

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
    json_body_response,
    json_response,
    listing_response,
)
from lunastor.meta.store import VolumeSpec, volume_view

VOLUME_ID = Param("volume_id", "path", schemas.volume_id, "volume id (vol-...)")


async def create_volume(call: Call) -> web.Response:
    body = call.body
    spec = VolumeSpec(
        name=body["name"],
        size_bytes=body["size_bytes"],
        replicas=body.get("replicas", 3),
        block_size=body.get("block_size", 512),
        labels=body.get("labels", {}),
        source=body.get("source"),
        zones=body.get("zones", []),
        qos=body.get("qos", {}),
    )
    store = call.app[STORE_KEY]
    volume, created = await store.create_volume(spec)
    return json_body_response(store.volume_json(volume), 201 if created else 200)


async def get_volume(call: Call) -> web.Response:
    volume = await call.app[STORE_KEY].get_volume(call.params["volume_id"])
    return json_response(volume_view(volume))


async def list_volumes(call: Call) -> web.Response:
    store = call.app[STORE_KEY]
    name = call.params.get("name")
    if name is not None:
        found = await store.find_volume(name)
        revision = await store.etcd.revision()
        items = [volume_view(found)] if found is not None else []
        return json_response({"items": items, "next": None, "revision": revision})
    limit = call.params.get("limit", schemas.LIST_LIMIT_DEFAULT)
    return listing_response(await store.list_volumes(limit, call.params.get("next")))


async def delete_volume(call: Call) -> web.Response:
    force = call.params.get("force", False)
    await call.app[STORE_KEY].delete_volume(call.params["volume_id"], force)
    return web.Response(status=204)


async def expand_volume(call: Call) -> web.Response:
    store = call.app[STORE_KEY]
    volume = await store.expand_volume(call.params["volume_id"], call.body["size_bytes"])
    return json_response(volume_view(volume))


async def update_volume(call: Call) -> web.Response:
    store = call.app[STORE_KEY]
    volume = await store.set_qos(call.params["volume_id"], call.body["qos"])
    return json_response(volume_view(volume))


ROUTES = [
    Route(
        "POST",
        "/v1/volumes",
        create_volume,
        "createVolume",
        "Create a volume (idempotent by name; CSI CreateVolume)",
        "volumes",
        CSI_ROLES,
        body=schemas.VOLUME_CREATE,
        responses={201: "Volume", 200: "Volume", 404: "Problem", 409: "Problem", 507: "Problem"},
    ),
    Route(
        "GET",
        "/v1/volumes",
        list_volumes,
        "listVolumes",
        "List volumes, paginated at one etcd revision; ?name= finds one by name",
        "volumes",
        ALL_ROLES,
        params=(
            Param("limit", "query", schemas.LIMIT, "page size (default 100)"),
            Param("next", "query", schemas.NEXT, "token from the previous page"),
            Param("name", "query", schemas.name, "find the volume with this name"),
        ),
        responses={200: "VolumePage", 410: "Problem"},
    ),
    Route(
        "GET",
        "/v1/volumes/{volume_id}",
        get_volume,
        "getVolume",
        "Get a volume (CSI ControllerGetVolume)",
        "volumes",
        ALL_ROLES,
        params=(VOLUME_ID,),
        responses={200: "Volume"},
    ),
    Route(
        "DELETE",
        "/v1/volumes/{volume_id}",
        delete_volume,
        "deleteVolume",
        "Delete a volume; refused while exported unless force=true (CSI DeleteVolume)",
        "volumes",
        CSI_ROLES,
        params=(VOLUME_ID, Param("force", "query", schemas.FORCE, "delete even if exported")),
        responses={204: None, 409: "Problem"},
    ),
    Route(
        "PATCH",
        "/v1/volumes/{volume_id}",
        update_volume,
        "updateVolume",
        "Change a volume's QoS limits online (a field set to null or 0 clears it; "
        "CSI ControllerModifyVolume)",
        "volumes",
        CSI_ROLES,
        params=(VOLUME_ID,),
        body=schemas.VOLUME_UPDATE,
        responses={200: "Volume", 400: "Problem", 404: "Problem"},
    ),
    Route(
        "POST",
        "/v1/volumes/{volume_id}/expand",
        expand_volume,
        "expandVolume",
        "Grow a volume online; shrinking is refused (CSI ControllerExpandVolume)",
        "volumes",
        CSI_ROLES,
        params=(VOLUME_ID,),
        body=schemas.VOLUME_EXPAND,
        responses={200: "Volume", 409: "Problem"},
    ),
]
