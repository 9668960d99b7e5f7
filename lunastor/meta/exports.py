"""`/v1/volumes/{id}/exports`: LUN masking. Publishing adds the initiator to the LUN's ACL."""

from __future__ import annotations

from aiohttp import web

from lunastor.meta import schemas
from lunastor.meta.context import STORE_KEY
from lunastor.meta.routing import ALL_ROLES, CSI_ROLES, Call, Param, Route, json_response
from lunastor.meta.volumes import VOLUME_ID


async def add_export(call: Call) -> web.Response:
    store = call.app[STORE_KEY]
    body = call.body
    view, created = await store.add_export(
        call.params["volume_id"], body["initiator"], body.get("exclusive", False)
    )
    return json_response(view, 201 if created else 200)


async def remove_export(call: Call) -> web.Response:
    await call.app[STORE_KEY].remove_export(call.params["volume_id"], call.params["initiator"])
    return web.Response(status=204)


async def list_exports(call: Call) -> web.Response:
    items = await call.app[STORE_KEY].list_exports(call.params["volume_id"])
    return json_response({"items": items})


ROUTES = [
    Route(
        "POST",
        "/v1/volumes/{volume_id}/exports",
        add_export,
        "addExport",
        "Let an initiator see the volume's LUN (CSI ControllerPublishVolume)",
        "exports",
        CSI_ROLES,
        params=(VOLUME_ID,),
        body=schemas.EXPORT_CREATE,
        responses={201: "Export", 200: "Export", 409: "Problem", 507: "Problem"},
    ),
    Route(
        "GET",
        "/v1/volumes/{volume_id}/exports",
        list_exports,
        "listExports",
        "Initiators the volume is exported to",
        "exports",
        ALL_ROLES,
        params=(VOLUME_ID,),
        responses={200: "ExportList"},
    ),
    Route(
        "DELETE",
        "/v1/volumes/{volume_id}/exports/{initiator}",
        remove_export,
        "removeExport",
        "Hide the LUN from an initiator (CSI ControllerUnpublishVolume); missing is fine",
        "exports",
        CSI_ROLES,
        params=(VOLUME_ID, Param("initiator", "path", schemas.initiator, "initiator IQN")),
        responses={204: None, 409: "Problem"},
    ),
]
