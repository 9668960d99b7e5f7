"""Cross-cutting rules: auth per route, pagination pinned to a revision, concurrent creates
from two meta instances, the OpenAPI document matching the router, request metrics."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from lunastor.common.records import Keys
from lunastor.meta.app import OPENAPI_PATH, ROUTES
from lunastor.meta.routing import ADMIN_ONLY, ALL_ROLES, CSI_ROLES
from tests.integration.meta.conftest import Api, meta_config, start_api
from tests.support.etcd import EtcdServer

GIB = 1 << 30
VOL = "vol-0000000000000000"
TGT = "iqn.2026-11.io.lunastor:tgt-0"
CHUNK = "chunk-000000000000"


@pytest.mark.parametrize(
    ("method", "path", "body", "allowed"),
    [
        ("GET", "/v1/volumes", None, ALL_ROLES),
        ("POST", "/v1/volumes", {"name": "auth", "size_bytes": GIB}, CSI_ROLES),
        ("DELETE", f"/v1/volumes/{VOL}", None, CSI_ROLES),
        ("POST", "/v1/snapshots", {"name": "s", "volume_id": VOL}, CSI_ROLES),
        ("GET", "/v1/capacity", None, ALL_ROLES),
        ("GET", "/v1/targets", None, ALL_ROLES),
        ("PUT", f"/v1/targets/{TGT}/chap", {"user": "u", "secret": "0123456789ab"}, ADMIN_ONLY),
        ("DELETE", "/v1/discovery-chap", None, ADMIN_ONLY),
        ("POST", f"/v1/chunks/{CHUNK}/drain", None, ADMIN_ONLY),
        ("DELETE", f"/v1/chunks/{CHUNK}", None, ADMIN_ONLY),
        ("GET", "/v1/operations", None, ALL_ROLES),
    ],
)
async def test_roles_per_route(
    api: Api, method: str, path: str, body: Any, allowed: frozenset[str]
) -> None:
    status, problem = await api.call(method, path, body, role=None)
    assert status == 401 and problem["code"] == "unauthenticated"
    for role in ("admin", "csi", "reader"):
        status, out = await api.call(method, path, body, role=role)
        if role in allowed:
            assert status not in (401, 403), (role, status, out)
        else:
            assert status == 403 and out["code"] == "forbidden", (role, status, out)


@pytest.mark.parametrize(
    "header", ["", "Bearer", "Bearer ", "Basic YWRtaW46eA==", "Bearer wrong", "admin-t"]
)
async def test_bad_credentials_are_401(api: Api, header: str) -> None:
    resp = await api.client.get("/v1/volumes", headers={"Authorization": header} if header else {})
    assert resp.status == 401
    assert (await resp.json(content_type=None))["code"] == "unauthenticated"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_public_paths_need_no_token_and_show_no_secrets(api: Api) -> None:
    for path in ("/healthz", "/metrics", OPENAPI_PATH):
        resp = await api.client.get(path)
        assert resp.status == 200, path
        text = await resp.text()
        assert "admin-t" not in text and "test-sealing-key" not in text


async def test_pagination_is_pinned_to_one_revision(api: Api) -> None:
    created = {(await api.volume(f"page-{i:02d}"))["id"] for i in range(23)}
    status, first = await api.call("GET", "/v1/volumes?limit=5")
    assert status == 200 and len(first["items"]) == 5 and first["next"]
    # Changes after the first page do not show up in the rest of this listing.
    late = await api.volume("late")
    await api.ok("DELETE", f"/v1/volumes/{first['items'][0]['id']}", status=204)
    seen = [v["id"] for v in first["items"]]
    token = first["next"]
    while token:
        page = await api.ok("GET", f"/v1/volumes?limit=5&next={token}")
        assert page["revision"] == first["revision"]
        seen += [v["id"] for v in page["items"]]
        token = page["next"]
    assert len(seen) == len(set(seen)) and set(seen) == created
    assert late["id"] not in seen
    fresh = await api.ok("GET", "/v1/volumes?limit=1000")
    assert {v["id"] for v in fresh["items"]} == created - {seen[0]} | {late["id"]}


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=1&limit=2", "limit"),
        ("next=bm9wZQ", "next"),
        ("next=%%%", "next"),
        ("next=WzEsIi4uLyJd", "next"),  # [1,"../"]: a token we never issue
        ("name=bad%20name", "name"),
    ],
)
async def test_bad_list_parameters_name_the_field(api: Api, query: str, field: str) -> None:
    status, problem = await api.call("GET", f"/v1/volumes?{query}")
    assert status == 400 and problem["field"] == field, problem


async def test_expired_token_is_410(api: Api) -> None:
    for i in range(3):
        await api.volume(f"exp-{i}")
    first = await api.ok("GET", "/v1/volumes?limit=1")
    await api.volume("exp-more")
    await api.etcd.compact(await api.etcd.revision())
    status, problem = await api.call("GET", f"/v1/volumes?limit=1&next={first['next']}")
    assert status == 410 and problem["code"] == "token_expired"


async def test_concurrent_creates_from_two_instances(
    api: Api, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """200 creates over 50 names, spread over two meta instances: exactly 50 volumes, every
    answer for a name the same volume, and no LUN shared."""
    client2, etcd2, luns2 = await start_api(meta_config(etcd_server, etcd_prefix))
    other = Api(client2, etcd2, luns2)
    try:
        names = [f"c-{i:02d}" for i in range(50)]
        jobs = [
            (api if n % 2 else other).call(
                "POST", "/v1/volumes", {"name": names[n % 50], "size_bytes": GIB}
            )
            for n in range(200)
        ]
        answers = await asyncio.gather(*jobs)
    finally:
        await client2.close()
        await luns2.stop()
        await etcd2.close()
    assert Counter(status for status, _ in answers) == {201: 50, 200: 150}
    by_name: dict[str, dict[str, Any]] = {}
    for _, body in answers:
        assert by_name.setdefault(body["name"], body) == body
    listed = await api.ok("GET", "/v1/volumes?limit=1000")
    assert sorted(v["name"] for v in listed["items"]) == names
    slots = [(v["target_iqn"], v["lun"]) for v in listed["items"]]
    assert len(set(slots)) == 50
    kvs, _ = await api.etcd.get_prefix(Keys.LUNS)
    assert len(kvs) == 50


async def test_openapi_document_matches_the_router(api: Api) -> None:
    spec = await api.ok("GET", OPENAPI_PATH)
    assert spec["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    served = {
        (r.method, r.resource.canonical)
        for r in api.client.app.router.routes()
        if r.resource is not None and r.resource.canonical.startswith("/v1/") and r.method != "HEAD"
    }
    served.discard(("GET", OPENAPI_PATH))
    assert documented == served == {(r.method, r.path) for r in ROUTES}
    for path, ops in spec["paths"].items():
        for op in ops.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(path.replace("}", "{").split("{")[1::2]), path
            for code in ("401", "403", "503"):
                assert code in op["responses"], (path, code)


async def test_request_metrics_by_route_and_status(api: Api) -> None:
    await api.call("GET", "/v1/volumes/vol-0000000000000000")
    text = await (await api.client.get("/metrics")).text()
    assert (
        'lunastor_api_requests_total{method="GET",route="/v1/volumes/{volume_id}",status="404"}'
        in text
    )
    bucket = (
        'lunastor_api_request_seconds_bucket{le="0.01",method="GET",'
        'route="/v1/volumes/{volume_id}",status="404"}'
    )
    assert bucket in text


async def test_unsupported_method_is_405_with_allow(api: Api) -> None:
    resp = await api.client.request(
        "PATCH", "/v1/volumes", headers={"Authorization": "Bearer admin-t"}
    )
    assert resp.status == 405
    assert set(resp.headers["Allow"].split(",")) == {"GET", "POST"}
    assert (await resp.json(content_type=None))["code"] == "method_not_allowed"
