"""`/v1/chunks`: chunk servers with their admin state; drain and remove."""

from __future__ import annotations

from aiohttp import web

from lunastor.meta import schemas
from lunastor.meta.context import CLUSTER_STORE_KEY
from lunastor.meta.routing import ADMIN_ONLY, ALL_ROLES, Call, Param, Route, json_response

CHUNK_ID = Param("chunk_id", "path", schemas.chunk_id, "chunk server id (chunk-...)")


async def list_chunks(call: Call) -> web.Response:
    return json_response({"items": await call.app[CLUSTER_STORE_KEY].list_chunks()})


async def get_chunk(call: Call) -> web.Response:
    return json_response(await call.app[CLUSTER_STORE_KEY].get_chunk(call.params["chunk_id"]))


async def drain_chunk(call: Call) -> web.Response:
    op, created = await call.app[CLUSTER_STORE_KEY].drain_chunk(call.params["chunk_id"])
    return json_response(op, 202 if created else 200)


async def remove_chunk(call: Call) -> web.Response:
    await call.app[CLUSTER_STORE_KEY].remove_chunk(call.params["chunk_id"])
    return web.Response(status=204)


ROUTES = [
    Route(
        "GET",
        "/v1/chunks",
        list_chunks,
        "listChunkServers",
        "Chunk servers: state (up, draining, down), admin state, zone, capacity",
        "chunks",
        ALL_ROLES,
        responses={200: "ChunkServerList"},
    ),
    Route(
        "GET",
        "/v1/chunks/{chunk_id}",
        get_chunk,
        "getChunkServer",
        "One chunk server",
        "chunks",
        ALL_ROLES,
        params=(CHUNK_ID,),
        responses={200: "ChunkServer"},
    ),
    Route(
        "POST",
        "/v1/chunks/{chunk_id}/drain",
        drain_chunk,
        "drainChunkServer",
        "Start moving everything off a chunk server (idempotent); returns the operation",
        "chunks",
        ADMIN_ONLY,
        params=(CHUNK_ID,),
        responses={202: "Operation", 200: "Operation", 409: "Problem"},
    ),
    Route(
        "DELETE",
        "/v1/chunks/{chunk_id}",
        remove_chunk,
        "removeChunkServer",
        "Forget a chunk server that is down or drained and holds nothing",
        "chunks",
        ADMIN_ONLY,
        params=(CHUNK_ID,),
        responses={204: None, 409: "Problem"},
    ),
]
