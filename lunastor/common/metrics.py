"""Prometheus metrics shared by the daemons, and the `/metrics` + `/healthz` admin endpoints."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, Info, generate_latest

import lunastor

BUILD_INFO = Info("lunastor_build", "lunastor version and daemon kind")
ETCD_LEASE_HELD = Gauge("lunastor_etcd_lease_held", "1 while this daemon's etcd lease is alive")

HealthCheck = Callable[[], Awaitable[dict[str, object]]]


def describe_daemon(daemon: str) -> None:
    BUILD_INFO.info({"version": lunastor.__version__, "daemon": daemon})


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def health_handler(check: HealthCheck) -> Callable[[web.Request], Awaitable[web.Response]]:
    """`/healthz`: 200 with {"status": "ok", ...} when healthy, else 503; never reveals secrets."""

    async def handler(request: web.Request) -> web.Response:
        details = await check()
        healthy = details.get("status") == "ok"
        return web.json_response(details, status=200 if healthy else 503)

    return handler


def add_admin_routes(app: web.Application, check: HealthCheck) -> None:
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", health_handler(check))
