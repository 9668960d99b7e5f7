"""The meta service's aiohttp application: middlewares (request context, auth, problems) and
routes. Handlers live in modules by resource; this file only wires them."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from lunastor.common.etcd import Etcd, EtcdError
from lunastor.common.logs import get_logger
from lunastor.common.metrics import add_admin_routes
from lunastor.common.records import (
    ChunkServerInfo,
    ChunkServerStatus,
    Keys,
    MetaInstance,
    RecordError,
    RedirectorInstance,
)
from lunastor.meta.cluster import cluster_view
from lunastor.meta.config import MetaConfig
from lunastor.meta.problems import Problem, problem_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ETCD_KEY = web.AppKey("etcd", Etcd)
CONFIG_KEY = web.AppKey("config", MetaConfig)
PUBLIC_PATHS = {"/healthz", "/metrics"}
# role -> may it call this method? (finer rules per route arrive with the resources)
ROLE_METHODS = {
    "admin": {"GET", "POST", "PUT", "PATCH", "DELETE"},
    "csi": {"GET", "POST", "PUT", "PATCH", "DELETE"},
    "reader": {"GET", "HEAD"},
}

log = get_logger(component="api")


@web.middleware
async def context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:16]
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        response = await handler(request)
        response.headers["X-Request-Id"] = request_id
        return response


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a problem body; nothing a client sends may produce a traceback."""
    try:
        return await handler(request)
    except Problem as p:
        return problem_response(p.status, p.code, p.detail, **p.extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return problem_response(exc.status, code, exc.text or exc.reason)
    except EtcdError as exc:
        log.error("etcd unavailable", error=str(exc))
        return problem_response(503, "metadata_unavailable", f"etcd: {exc}")
    except Exception:
        log.exception("unexpected error", method=request.method, path=request.path)
        return problem_response(500, "internal_error", "unexpected error; see the meta log")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Problem(401, "unauthenticated", "a bearer token is required")
    role = request.app[CONFIG_KEY].auth.role_of(token.strip())
    if role is None:
        raise Problem(401, "unauthenticated", "unknown bearer token")
    if request.method not in ROLE_METHODS[role]:
        raise Problem(403, "forbidden", f"role {role} may not {request.method} {request.path}")
    request["role"] = role
    return await handler(request)


def _decode_all(kvs: list[Any], cls: Any) -> list[Any]:
    out = []
    for kv in kvs:
        try:
            out.append(cls.from_json(kv.value))
        except RecordError as exc:
            log.warning("skipping undecodable record", key=kv.key, error=str(exc))
    return out


async def get_cluster(request: web.Request) -> web.Response:
    etcd = request.app[ETCD_KEY]
    # One revision for the whole view, so it is a consistent snapshot.
    infos, rev = await etcd.get_prefix(Keys.CHUNKS)
    statuses, _ = await etcd.get_prefix(Keys.LIVE_CHUNKS, revision=rev)
    metas, _ = await etcd.get_prefix(Keys.LIVE_META, revision=rev)
    redirectors, _ = await etcd.get_prefix(Keys.LIVE_REDIRECTORS, revision=rev)
    candidates, _ = await etcd.get_prefix(Keys.REDIRECTOR_ELECTION + "/", revision=rev)
    leader = min(candidates, key=lambda kv: kv.create_revision, default=None)
    view = cluster_view(
        _decode_all(infos, ChunkServerInfo),
        _decode_all(statuses, ChunkServerStatus),
        _decode_all(metas, MetaInstance),
        _decode_all(redirectors, RedirectorInstance),
        leader.value.decode() if leader is not None else None,
    )
    view["revision"] = rev
    return web.json_response(view)


def make_app(
    config: MetaConfig, etcd: Etcd, health: Callable[[], Awaitable[dict[str, Any]]]
) -> web.Application:
    app = web.Application(
        middlewares=[context_middleware, problem_middleware, auth_middleware],
        client_max_size=1024 * 1024,
    )
    app[ETCD_KEY] = etcd
    app[CONFIG_KEY] = config
    add_admin_routes(app, health)
    app.router.add_get("/v1/cluster", get_cluster)
    return app
