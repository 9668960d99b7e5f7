"""The meta service's aiohttp application: middlewares (request context, metrics, problems,
authentication) and the route table. Handlers live in one module per resource; authorisation
is per route (`routing.Route.roles`)."""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import Counter, Histogram

from lunastor.common.etcd import Etcd, EtcdError
from lunastor.common.logs import get_logger
from lunastor.common.metrics import add_admin_routes
from lunastor.common.records import RecordError
from lunastor.common.sealing import Sealer
from lunastor.meta import (
    chunks,
    events,
    exports,
    health,
    operations,
    snapshots,
    targets,
    volume_metrics,
    volume_status,
    volumes,
    whoami,
)
from lunastor.meta.cluster_store import ClusterStore
from lunastor.meta.config import MetaConfig
from lunastor.meta.context import CLUSTER_STORE_KEY, CONFIG_KEY, ETCD_KEY, ROLE_KEY, STORE_KEY
from lunastor.meta.luns import LunMap
from lunastor.meta.openapi import build_spec
from lunastor.meta.problems import Problem, problem_response
from lunastor.meta.routing import Route, register
from lunastor.meta.store import Store
from lunastor.meta.ui import add_ui_routes, is_ui_path

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ROUTES: list[Route] = [
    *volumes.ROUTES,
    *exports.ROUTES,
    *snapshots.ROUTES,
    *targets.ROUTES,
    *chunks.ROUTES,
    *health.ROUTES,
    *operations.ROUTES,
    *volume_status.ROUTES,
    *volume_metrics.ROUTES,
    *events.ROUTES,
    *whoami.ROUTES,
]
OPENAPI_PATH = "/v1/openapi.json"
PUBLIC_PATHS = {"/healthz", "/metrics", OPENAPI_PATH}

REQUESTS = Counter(
    "lunastor_api_requests_total",
    "REST requests by route and status",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "lunastor_api_request_seconds",
    "REST request latency by route and status",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

log = get_logger(component="api")

# Request ids: a random prefix per process and a counter, 16 hex digits as before; unique
# across instances and restarts without asking the kernel for randomness per request.
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count()
# The metric children by (method, route, status): `labels()` validates and hashes its
# arguments on every call, and a route's children never change.
_CHILDREN: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}


def _metrics(method: str, route: str, status: str) -> tuple[Counter, Histogram]:
    key = (method, route, status)
    children = _CHILDREN.get(key)
    if children is None:
        children = _CHILDREN[key] = (
            REQUESTS.labels(method, route, status),
            LATENCY.labels(method, route, status),
        )
    return children


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request: its id in every log line, its count and latency by route, who calls
    (bearer token -> role; what the role may do is each route's rule), and every failure as
    a problem body (nothing a client sends may produce a traceback).

    One layer, not one per concern, and `bind`/`reset` rather than structlog's context
    manager: at 50 concurrent clients each layer around a request is measurable
    (docs/scale.md)."""
    start = time.perf_counter()
    request_id = (
        request.headers.get("X-Request-Id", "")[:64]
        or f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"
    )
    tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        response = await _answer(request, handler)
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
    response.headers["X-Request-Id"] = request_id
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    count, latency = _metrics(request.method, route, str(response.status))
    count.inc()
    latency.observe(time.perf_counter() - start)
    return response


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if request.path not in PUBLIC_PATHS and not is_ui_path(request.path):
            request[ROLE_KEY] = _role(request)  # the UI's files hold no data
        return await handler(request)
    except Problem as p:
        return problem_response(p.status, p.code, p.detail, **p.extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        response = problem_response(exc.status, code, exc.text or exc.reason)
        if "Allow" in exc.headers:  # 405 must say what is allowed (RFC 9110 15.5.6)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except EtcdError as exc:
        log.error("etcd unavailable", error=str(exc))
        return problem_response(503, "metadata_unavailable", f"etcd: {exc}")
    except RecordError as exc:
        log.error("undecodable record", error=str(exc))
        return problem_response(500, "corrupt_record", str(exc))
    except Exception:
        log.exception("unexpected error", method=request.method, path=request.path)
        return problem_response(500, "internal_error", "unexpected error; see the meta log")


def _role(request: web.Request) -> str:
    """The caller's role from its bearer token; Problem 401 without a known one."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Problem(401, "unauthenticated", "a bearer token is required")
    role = request.app[CONFIG_KEY].auth.role_of(token.strip())
    if role is None:
        raise Problem(401, "unauthenticated", "unknown bearer token")
    return role


def make_app(
    config: MetaConfig,
    etcd: Etcd,
    health_check: Callable[[], Awaitable[dict[str, Any]]],
    luns: LunMap,
) -> web.Application:
    app = web.Application(
        middlewares=[api_middleware],
        client_max_size=1024 * 1024,
    )
    sealer = Sealer(config.secret_key) if config.secret_key else None
    app[ETCD_KEY] = etcd
    app[CONFIG_KEY] = config
    app[STORE_KEY] = Store(etcd, luns, config.portal)
    app[CLUSTER_STORE_KEY] = ClusterStore(etcd, luns, sealer)
    add_admin_routes(app, health_check)
    app[whoami.ROUTES_KEY] = tuple(ROUTES)
    register(app, ROUTES)
    add_ui_routes(app)
    spec = build_spec(ROUTES)

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(spec)

    app.router.add_get(OPENAPI_PATH, openapi)
    return app
