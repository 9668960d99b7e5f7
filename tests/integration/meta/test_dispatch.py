"""Meta's dispatcher (lunastor/meta/dispatch.py): it takes exactly the requests aiohttp's
router would give an API route, with the same path values, and a client gets the same answer
either way (status, headers, problem bodies, metrics)."""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from prometheus_client import REGISTRY

from lunastor.meta.app import ROUTES
from lunastor.meta.dispatch import Dispatcher
from tests.integration.meta.conftest import TOKENS, meta_config, start_api
from tests.support.etcd import EtcdServer

API_ROUTES = {(r.method, r.path) for r in ROUTES}
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
# values for path parameters: plain, encoded "/" and "%" (the router decodes them in the
# value), braces (the router's pattern refuses them), others the path decodes
VALUES = (
    "vol-0000000000000000",
    "iqn.2026-11.io.lunastor:tgt-0",
    "a%2Fb",
    "x%25y",
    "%7Bx%7D",
    "sp%20ace",
    "%C3%BC",
    "a%2F",
    "-",
)
TOKENS_OF_PATHS = ("v1", "volumes", "exports", "targets", "chap", "rotate", "x", "", "%2F", "{")


def api_paths() -> list[str]:
    """Every route's path with every sample value, and near misses of each."""
    paths = ["/", "/ui", "/ui/", "/ui/app.js", "/metrics", "/healthz", "/v1/openapi.json", "/v1"]
    for _, template in sorted(API_ROUTES):
        for value in VALUES:
            path = re.sub(r"\{[a-z_]+\}", value, template)
            paths += [path, path + "/", path + "/x", path.replace("/v1/", "/v1//"), path[:-1]]
    rng = random.Random(17)
    for _ in range(2000):
        paths.append("/" + "/".join(rng.choices(TOKENS_OF_PATHS, k=rng.randint(1, 6))))
    return paths


@dataclass
class Served:
    client: TestClient[Any, Any]
    fallbacks: list[str]  # paths the dispatcher handed to the application


@pytest.fixture
async def both(etcd_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[tuple[Served, Served]]:
    """The application served with a dispatcher (counting what it hands on) and without."""
    served, stops = [], []
    for with_dispatcher in (True, False):
        client, etcd, luns = await start_api(meta_config(etcd_server, etcd_prefix), False)
        fallbacks: list[str] = []
        if with_dispatcher:
            server = client.server.runner.server if client.server.runner else None
            assert server is not None
            app_handler = server.request_handler

            async def counting(
                request: web.BaseRequest, app_handler: Any = app_handler, seen: Any = fallbacks
            ) -> Any:
                seen.append(request.path)
                return await app_handler(request)

            server.request_handler = Dispatcher(client.server.app, ROUTES, counting)
        served.append(Served(client, fallbacks))
        stops.append((client, etcd, luns))
    yield served[0], served[1]
    for client, etcd, luns in stops:
        await client.close()
        await luns.stop()
        await etcd.close()


async def test_the_dispatcher_takes_what_the_router_gives_an_api_route(
    both: tuple[Served, Served],
) -> None:
    fast, _ = both
    app = fast.client.server.app
    assert app is not None
    dispatcher = Dispatcher(app, ROUTES, fallback=None)  # type: ignore[arg-type]
    taken = 0
    for path in api_paths():
        for method in METHODS:
            request = make_mocked_request(method, path, app=app)
            match_info = await app.router.resolve(request)
            found = dispatcher.match(method, request.rel_url.path_safe)
            resource = match_info.route.resource
            if match_info.http_exception is not None or resource is None:
                assert found is None, (method, path)
                continue
            if (method, resource.canonical) not in API_ROUTES:
                assert found is None, (method, path, resource.canonical)
                continue
            assert found is not None, (method, path)
            endpoint, values = found
            assert (endpoint.route.method, endpoint.route.path) == (method, resource.canonical)
            assert values == dict(match_info), (method, path)
            taken += 1
    assert taken > len(API_ROUTES) * 3  # the corpus reaches every route with several values


# (method, path, role, body bytes, extra headers): every answer but the created volume's
# carries no id of either server, so the two answers must be equal byte for byte
REQUESTS: list[tuple[str, str, str | None, bytes | None, dict[str, str]]] = [
    ("POST", "/v1/volumes", None, b'{"name": "n", "size_bytes": 1073741824}', {}),
    ("POST", "/v1/volumes", "reader", b'{"name": "n", "size_bytes": 1073741824}', {}),
    ("POST", "/v1/volumes", "admin", b"not json", {}),
    ("POST", "/v1/volumes", "admin", b"", {}),
    ("POST", "/v1/volumes", "admin", b'{"name": 1, "size_bytes": 1073741824}', {}),
    ("POST", "/v1/volumes", "admin", b'{"name": "' + b"a" * (1 << 20) + b'"}', {}),
    ("GET", "/v1/volumes/vol-0000000000000000", "admin", None, {"X-Request-Id": "mine-1"}),
    ("GET", "/v1/volumes/nope", "admin", None, {}),
    ("GET", "/v1/volumes?limit=abc", "admin", None, {}),
    ("GET", "/v1/volumes?limit=1&limit=2", "reader", None, {}),
    ("DELETE", "/v1/volumes/vol-0000000000000000/exports/iqn.x", "csi", None, {}),
    ("POST", "/v1/volumes/vol-0000000000000000/exports", "csi", b'{"initiator": "i"}', {}),
    ("DELETE", "/v1/volumes/vol-0000000000000000", "reader", None, {}),
    ("GET", "/v1/whoami", "csi", None, {}),
    ("GET", "/v1/targets/a%2Fb", "admin", None, {}),
    ("PATCH", "/v1/volumes", "admin", None, {}),  # 405: the application's
    ("GET", "/v1/nothing", "admin", None, {}),  # 404: the application's
    ("GET", "/healthz", None, None, {}),  # the application's
]
HANDED_ON = ["/v1/volumes", "/v1/nothing", "/healthz"]


async def _ask(
    client: TestClient[Any, Any],
    method: str,
    path: str,
    role: str | None,
    body: bytes | None,
    headers: dict[str, str],
) -> tuple[int, dict[str, str], bytes]:
    headers = dict(headers)
    if role is not None:
        headers["Authorization"] = f"Bearer {TOKENS[role]}"
    if body is not None:
        headers["Content-Type"] = "application/json"
    resp = await client.request(method, path, data=body, headers=headers)
    answer = await resp.read()
    kept = {k: v for k, v in resp.headers.items() if k.lower() not in ("date", "x-request-id")}
    request_id = resp.headers["X-Request-Id"]
    if "X-Request-Id" in headers:
        assert request_id == headers["X-Request-Id"]
    else:
        assert re.fullmatch("[0-9a-f]{16}", request_id), request_id
    return resp.status, kept, answer


def _count(method: str, route: str, status: int) -> float:
    labels = {"method": method, "route": route, "status": str(status)}
    return REGISTRY.get_sample_value("lunastor_api_requests_total", labels) or 0.0


async def test_a_client_gets_the_same_answer_either_way(both: tuple[Served, Served]) -> None:
    fast, plain = both
    for method, path, role, body, headers in REQUESTS:
        got = await _ask(fast.client, method, path, role, body, headers)
        want = await _ask(plain.client, method, path, role, body, headers)
        assert got == want, (method, path)
        assert got[0] >= 400 or path in ("/v1/whoami", "/healthz"), got
    assert fast.fallbacks == HANDED_ON
    # an interim answer (Expect: 100-continue) is the application's too, and works
    created = []
    for served, name in ((fast, "e-fast"), (plain, "e-plain")):
        resp = await served.client.post(
            "/v1/volumes",
            json={"name": name, "size_bytes": 1 << 30},
            headers={"Authorization": "Bearer admin-t"},
            expect100=True,
        )
        created.append((resp.status, sorted((await resp.json()).keys())))
    assert created[0] == created[1] and created[0][0] == 201
    assert fast.fallbacks == [*HANDED_ON, "/v1/volumes"]


async def test_metrics_count_a_request_under_its_route_either_way(
    both: tuple[Served, Served],
) -> None:
    fast, plain = both
    route = "/v1/volumes/{volume_id}"
    for served in (fast, plain):
        before = _count("GET", route, 404)
        await _ask(served.client, "GET", "/v1/volumes/vol-0000000000000001", "admin", None, {})
        assert _count("GET", route, 404) == before + 1
    assert fast.fallbacks == []
