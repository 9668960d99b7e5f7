"""Targets and CHAP, chunk servers, capacity, health and operations against a real etcd."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lunastor.common.records import ExtentRecord, Keys, TargetRecord
from lunastor.common.sealing import Sealer
from lunastor.meta.planners import DrainPlanner
from tests.integration.meta.conftest import SECRET_KEY, Api, meta_config, register_chunk, start_api
from tests.support.etcd import EtcdServer

TGT0 = "iqn.2026-11.io.lunastor:tgt-0"
CHAP = {"user": "alice", "secret": "s3cret-s3cret!"}
MUTUAL = {**CHAP, "mutual_user": "tgt", "mutual_secret": "other-secret-42"}


async def test_targets_list_counts_luns_and_chap_is_never_returned(api: Api) -> None:
    await api.volume("a")
    await api.volume("b")
    listed = await api.ok("GET", "/v1/targets")
    assert listed == {
        "items": [
            {
                "iqn": TGT0,
                "index": 0,
                "luns": 2,
                "chap_enabled": False,
                "mutual_chap_enabled": False,
            }
        ],
        "discovery_chap_enabled": False,
    }
    view = await api.ok("PUT", f"/v1/targets/{TGT0}/chap", MUTUAL)
    assert view["chap_enabled"] and view["mutual_chap_enabled"]
    assert view["user"] == "alice" and view["mutual_user"] == "tgt"
    target = await api.ok("GET", f"/v1/targets/{TGT0}")
    assert target["chap_enabled"] and target["chap_user"] == "alice"
    everything = json.dumps([view, target, await api.ok("GET", "/v1/targets")])
    assert "s3cret" not in everything and "other-secret" not in everything

    # Stored sealed: not in plain text, and opens with the configured key only.
    raw = await api.etcd.get(Keys.target(0))
    assert raw is not None and b"s3cret" not in raw.value
    chap = TargetRecord.from_json(raw.value).chap
    assert chap is not None
    assert Sealer(SECRET_KEY).open(chap["secret"]) == CHAP["secret"]
    assert Sealer(SECRET_KEY).open(chap["mutual_secret"]) == MUTUAL["mutual_secret"]

    rotated = await api.ok("POST", f"/v1/targets/{TGT0}/chap/rotate", {"secret": "new-secret-123"})
    assert rotated["user"] == "alice" and rotated["mutual_chap_enabled"]
    raw = await api.etcd.get(Keys.target(0))
    assert raw is not None
    new_chap = TargetRecord.from_json(raw.value).chap
    assert new_chap is not None and Sealer(SECRET_KEY).open(new_chap["secret"]) == "new-secret-123"

    await api.ok("DELETE", f"/v1/targets/{TGT0}/chap", status=204)
    assert (await api.ok("GET", f"/v1/targets/{TGT0}"))["chap_enabled"] is False
    rotate = f"/v1/targets/{TGT0}/chap/rotate"
    status, problem = await api.call("POST", rotate, {"secret": "x" * 12})
    assert status == 409 and problem["code"] == "chap_not_enabled"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user": "u", "secret": "short"}, "secret"),
        ({"secret": "long-enough-secret"}, "user"),
        ({"user": "u", "secret": "long-enough-secret", "mutual_user": "m"}, "mutual_secret"),
        (
            {"user": "u", "secret": "long-enough-secret", "mutual_secret": "long-enough-other"},
            "mutual_user",
        ),
        (
            {
                "user": "u",
                "secret": "long-enough-secret",
                "mutual_user": "m",
                "mutual_secret": "long-enough-secret",
            },
            "mutual_secret",
        ),
        ({"user": "u", "secret": "has spaces in it"}, "secret"),
    ],
)
async def test_bad_chap_bodies_name_the_field(api: Api, body: dict[str, Any], field: str) -> None:
    for path in (f"/v1/targets/{TGT0}/chap", "/v1/discovery-chap"):
        status, problem = await api.call("PUT", path, body)
        assert status == 400 and problem["field"] == field, problem


async def test_unknown_target_and_discovery_chap(api: Api) -> None:
    status, problem = await api.call("GET", "/v1/targets/iqn.2026-11.io.lunastor:tgt-4096")
    assert status == 404 and problem["code"] == "target_not_found"
    status, problem = await api.call("GET", "/v1/targets/iqn.2000-01.com.other:x")
    assert status == 400 and problem["field"] == "target"
    assert await api.ok("GET", "/v1/discovery-chap") == {
        "chap_enabled": False,
        "mutual_chap_enabled": False,
    }
    view = await api.ok("PUT", "/v1/discovery-chap", CHAP)
    assert view["chap_enabled"] and not view["mutual_chap_enabled"] and "secret" not in view
    assert (await api.ok("GET", "/v1/targets"))["discovery_chap_enabled"] is True
    await api.ok("POST", "/v1/discovery-chap/rotate", {"secret": "rotated-secret"})
    status, problem = await api.call(
        "POST", "/v1/discovery-chap/rotate", {"secret": "rotated-again", "mutual_secret": "m" * 12}
    )
    assert status == 409 and problem["code"] == "mutual_chap_not_enabled"
    await api.ok("DELETE", "/v1/discovery-chap", status=204)
    assert (await api.ok("GET", "/v1/discovery-chap"))["chap_enabled"] is False


async def test_chap_needs_a_sealing_key(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    client, etcd, luns = await start_api(meta_config(etcd_server, etcd_prefix, secret_key=""))
    try:
        api = Api(client, etcd, luns)
        status, problem = await api.call("PUT", f"/v1/targets/{TGT0}/chap", CHAP)
        assert status == 409 and problem["code"] == "sealing_key_missing"
    finally:
        await client.close()
        await luns.stop()
        await etcd.close()


async def test_capacity_and_health_from_live_chunk_records(api: Api) -> None:
    empty = await api.ok("GET", "/v1/capacity")
    assert empty == {"total_bytes": 0, "free_bytes": 0, "chunk_servers": 0, "zones": []}
    health = await api.ok("GET", "/v1/health")
    assert health["status"] == "degraded" and "no chunk server is up" in health["problems"]

    gib = 1 << 30
    await register_chunk(api.etcd, "chunk-00000000000a", "z1", capacity=100 * gib, free=60 * gib)
    await register_chunk(api.etcd, "chunk-00000000000b", "z2", capacity=50 * gib, free=10 * gib)
    await register_chunk(
        api.etcd, "chunk-00000000000c", "z2", capacity=50 * gib, free=40 * gib, state="draining"
    )
    await register_chunk(api.etcd, "chunk-00000000000d", "z1", up=False)
    capacity = await api.ok("GET", "/v1/capacity")
    assert capacity == {
        "total_bytes": 200 * gib,
        "free_bytes": 70 * gib,  # the draining server's free space is not offered
        "chunk_servers": 3,
        "zones": [
            {"zone": "z1", "total_bytes": 100 * gib, "free_bytes": 60 * gib, "chunk_servers": 1},
            {"zone": "z2", "total_bytes": 100 * gib, "free_bytes": 10 * gib, "chunk_servers": 2},
        ],
    }
    assert (await api.ok("GET", "/v1/capacity?zone=z2"))["free_bytes"] == 10 * gib
    health = await api.ok("GET", "/v1/health")
    assert health["chunk_servers_up"] == 3 and health["chunk_servers_down"] == 1
    assert "chunk servers down: chunk-00000000000d" in health["problems"]
    assert health["redirector_leader"] is None


async def test_drain_and_remove_chunk_servers(api: Api) -> None:
    up, down = "chunk-0000000000a1", "chunk-0000000000a2"
    await register_chunk(api.etcd, up)
    await register_chunk(api.etcd, down, up=False)
    listed = await api.ok("GET", "/v1/chunks")
    assert [(c["id"], c["state"], c["admin_state"]) for c in listed["items"]] == [
        (up, "up", None),
        (down, "down", None),
    ]
    status, problem = await api.call("DELETE", f"/v1/chunks/{up}")
    assert status == 409 and problem["code"] == "chunk_server_in_service"

    status, op = await api.call("POST", f"/v1/chunks/{up}/drain")
    assert status == 202 and op["kind"] == "drain" and op["subject"] == up
    assert op["state"] == "running" and op["progress"] == 0
    assert await api.call("POST", f"/v1/chunks/{up}/drain") == (200, op)
    assert (await api.ok("GET", f"/v1/chunks/{up}"))["admin_state"] == "draining"
    assert await api.ok("GET", f"/v1/operations/{op['id']}") == op
    assert (await api.ok("GET", "/v1/operations"))["items"] == [op]

    # A server holding an extent replica cannot be removed and its drain does not finish.
    extent = ExtentRecord(volume="vol-x", index=0, replicas=[up])
    await api.etcd.put(Keys.extent("vol-x", 0), extent.to_json())
    planner = DrainPlanner(api.etcd)
    await planner.run_once()
    assert (await api.ok("GET", f"/v1/operations/{op['id']}"))["state"] == "running"
    status, problem = await api.call("DELETE", f"/v1/chunks/{up}")
    assert status == 409 and problem["code"] == "chunk_server_not_empty"
    await api.etcd.delete(Keys.extent("vol-x", 0))
    await planner.run_once()
    done = await api.ok("GET", f"/v1/operations/{op['id']}")
    assert done["state"] == "succeeded" and done["progress"] == 1.0
    assert (await api.ok("GET", f"/v1/chunks/{up}"))["admin_state"] == "drained"

    await api.ok("DELETE", f"/v1/chunks/{up}", status=204)
    await api.ok("DELETE", f"/v1/chunks/{down}", status=204)
    await api.ok("DELETE", f"/v1/chunks/{down}", status=204)
    assert await api.etcd.get(Keys.chunk(down)) is None
    status, problem = await api.call("POST", f"/v1/chunks/{down}/drain")
    assert status == 404 and problem["code"] == "chunk_server_not_found"
    status, problem = await api.call("GET", "/v1/operations/op-0000000000000000")
    assert status == 404 and problem["code"] == "operation_not_found"
