"""Volumes, exports and snapshots through the REST API against a real etcd."""

from __future__ import annotations

from typing import Any

import pytest

from lunastor.common.records import Keys, LunRecord, VolumeRecord
from tests.integration.meta.conftest import PORTAL, Api
from tests.support.procs import async_wait_for

GIB = 1 << 30


async def test_create_is_idempotent_by_name(api: Api) -> None:
    body = {"name": "pvc-1", "size_bytes": GIB, "labels": {"team": "db"}}
    status, first = await api.call("POST", "/v1/volumes", body)
    assert status == 201
    assert first["name"] == "pvc-1" and first["size_bytes"] == GIB
    assert first["replicas"] == 3 and first["block_size"] == 512 and first["source"] is None
    assert first["target_iqn"] == "iqn.2026-11.io.lunastor:tgt-0" and first["lun"] == 1
    status, again = await api.call("POST", "/v1/volumes", body)
    assert (status, again) == (200, first)
    assert await api.ok("GET", f"/v1/volumes/{first['id']}") == first
    found = await api.ok("GET", "/v1/volumes?name=pvc-1")
    assert found["items"] == [first] and found["next"] is None


@pytest.mark.parametrize(
    ("change", "differs"),
    [
        ({"size_bytes": 2 * GIB}, "size_bytes"),
        ({"replicas": 2}, "replicas"),
        ({"block_size": 4096}, "block_size"),
        ({"labels": {"team": "web"}}, "labels"),
    ],
)
async def test_same_name_other_parameters_is_a_conflict(
    api: Api, change: dict[str, Any], differs: str
) -> None:
    first = await api.volume("pvc-x", GIB, labels={"team": "db"})
    body = {"name": "pvc-x", "size_bytes": GIB, "labels": {"team": "db"}, **change}
    status, problem = await api.call("POST", "/v1/volumes", body)
    assert status == 409
    assert problem["code"] == "already_exists_with_different_parameters"
    assert differs in problem["detail"] and problem["volume_id"] == first["id"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "name"),
        ({"name": "a"}, "size_bytes"),
        ({"name": "", "size_bytes": GIB}, "name"),
        ({"name": "has space", "size_bytes": GIB}, "name"),
        ({"name": "a\n", "size_bytes": GIB}, "name"),
        ({"name": "x" * 129, "size_bytes": GIB}, "name"),
        ({"name": 5, "size_bytes": GIB}, "name"),
        ({"name": "a", "size_bytes": "1GiB"}, "size_bytes"),
        ({"name": "a", "size_bytes": 0}, "size_bytes"),
        ({"name": "a", "size_bytes": 1000}, "size_bytes"),
        ({"name": "a", "size_bytes": True}, "size_bytes"),
        ({"name": "a", "size_bytes": 1 << 51}, "size_bytes"),
        ({"name": "a", "size_bytes": 512, "block_size": 4096}, "size_bytes"),
        ({"name": "a", "size_bytes": GIB, "block_size": 1024}, "block_size"),
        ({"name": "a", "size_bytes": GIB, "replicas": 0}, "replicas"),
        ({"name": "a", "size_bytes": GIB, "replicas": 9}, "replicas"),
        ({"name": "a", "size_bytes": GIB, "labels": []}, "labels"),
        ({"name": "a", "size_bytes": GIB, "labels": {"k": 1}}, "labels.k"),
        ({"name": "a", "size_bytes": GIB, "labels": {"-bad": "v"}}, "labels.-bad"),
        ({"name": "a", "size_bytes": GIB, "source": {}}, "source"),
        (
            {"name": "a", "size_bytes": GIB, "source": {"volume_id": "vol-0", "snapshot_id": "x"}},
            "source",
        ),
        ({"name": "a", "size_bytes": GIB, "source": {"volume_id": "nope"}}, "source.volume_id"),
        ({"name": "a", "size_bytes": GIB, "colour": "red"}, "colour"),
        ([], "body"),
    ],
)
async def test_malformed_create_names_the_field(api: Api, body: Any, field: str) -> None:
    status, problem = await api.call("POST", "/v1/volumes", body)
    assert status == 400, problem
    assert problem["code"] == "invalid_field" and problem["field"] == field, problem


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"null x", b"[" * 200_000])
async def test_non_json_body_is_a_400(api: Api, raw: bytes) -> None:
    status, problem = await api.call("POST", "/v1/volumes", data=raw)
    assert status == 400 and problem["code"] == "invalid_json" and problem["field"] == "body"


async def test_get_and_delete_of_missing_and_malformed_ids(api: Api) -> None:
    status, problem = await api.call("GET", "/v1/volumes/vol-0000000000000000")
    assert status == 404 and problem["code"] == "volume_not_found"
    assert (await api.call("DELETE", "/v1/volumes/vol-0000000000000000"))[0] == 204
    status, problem = await api.call("GET", "/v1/volumes/bogus")
    assert status == 400 and problem["field"] == "volume_id"


async def test_delete_frees_name_and_lun_and_queues_gc(api: Api) -> None:
    vol = await api.volume("gone")
    assert await api.ok("DELETE", f"/v1/volumes/{vol['id']}", status=204) == ""
    assert await api.etcd.get(Keys.volume(vol["id"])) is None
    assert await api.etcd.get(Keys.volume_name("gone")) is None
    assert await api.etcd.get(Keys.lun(0, vol["lun"])) is None
    tomb = await api.etcd.get(Keys.gc_volume(vol["id"]))
    assert tomb is not None and VolumeRecord.from_json(tomb.value).id == vol["id"]
    again = await api.volume("gone")
    assert again["id"] != vol["id"]


async def test_luns_fill_target_zero_from_one(api: Api) -> None:
    luns = [(await api.volume(f"v{i}"))["lun"] for i in range(5)]
    assert luns == [1, 2, 3, 4, 5]
    record = await api.etcd.get(Keys.lun(0, 3))
    assert record is not None and LunRecord.from_json(record.value).initiators == []


async def test_expand_grows_online_and_refuses_to_shrink(api: Api) -> None:
    vol = await api.volume("grow", GIB)
    path = f"/v1/volumes/{vol['id']}/expand"
    grown = await api.ok("POST", path, {"size_bytes": 2 * GIB})
    assert grown == {**vol, "size_bytes": 2 * GIB}
    assert await api.ok("POST", path, {"size_bytes": 2 * GIB}) == grown
    status, problem = await api.call("POST", path, {"size_bytes": GIB})
    assert status == 400 and problem["code"] == "shrink_not_supported"
    assert problem["field"] == "size_bytes"
    status, problem = await api.call(
        "POST", "/v1/volumes/vol-0000000000000000/expand", {"size_bytes": GIB}
    )
    assert status == 404 and problem["code"] == "volume_not_found"
    vol4k = await api.volume("grow4k", GIB, block_size=4096)
    status, problem = await api.call(
        "POST", f"/v1/volumes/{vol4k['id']}/expand", {"size_bytes": GIB + 512}
    )
    assert status == 400 and problem["field"] == "size_bytes"


async def test_exports_publish_twice_same_answer_and_block_delete(api: Api) -> None:
    vol = await api.volume("pub")
    path = f"/v1/volumes/{vol['id']}/exports"
    initiator = "iqn.1994-05.com.redhat:node-1"
    status, export = await api.call("POST", path, {"initiator": initiator})
    assert status == 201
    assert export == {
        "volume_id": vol["id"],
        "initiator": initiator,
        "portal": PORTAL,
        "target_iqn": vol["target_iqn"],
        "lun": vol["lun"],
    }
    assert await api.call("POST", path, {"initiator": initiator.upper().replace("IQN", "iqn")}) == (
        200,
        export,
    )
    await api.ok("POST", path, {"initiator": "iqn.2020-01.org.example:node-2"}, status=201)
    listed = await api.ok("GET", path)
    assert [e["initiator"] for e in listed["items"]] == [
        initiator,
        "iqn.2020-01.org.example:node-2",
    ]
    status, problem = await api.call("DELETE", f"/v1/volumes/{vol['id']}")
    assert status == 409 and problem["code"] == "volume_in_use"
    await api.ok("DELETE", f"{path}/{initiator}", status=204)
    await api.ok("DELETE", f"{path}/{initiator}", status=204)  # twice: still fine
    status, problem = await api.call("DELETE", f"/v1/volumes/{vol['id']}")
    assert status == 409
    await api.ok("DELETE", f"/v1/volumes/{vol['id']}?force=true", status=204)
    assert await api.etcd.get(Keys.lun(0, vol["lun"])) is None
    # unpublishing from a deleted volume succeeds (CSI: safe to regard as unpublished)
    await api.ok("DELETE", f"{path}/{initiator}", status=204)
    status, problem = await api.call("POST", path, {"initiator": initiator})
    assert status == 404 and problem["code"] == "volume_not_found"


@pytest.mark.parametrize(
    "initiator", ["", "node-1", "iqn.bad", "iqn.2020-01.org.example:" + "x" * 220, "eui.123"]
)
async def test_bad_initiators_are_refused(api: Api, initiator: str) -> None:
    vol = await api.volume("acl")
    status, problem = await api.call(
        "POST", f"/v1/volumes/{vol['id']}/exports", {"initiator": initiator}
    )
    assert status == 400 and problem["field"] == "initiator", problem


async def test_snapshots_and_clones(api: Api) -> None:
    vol = await api.volume("src", GIB, block_size=4096)
    body = {"name": "snap-1", "volume_id": vol["id"]}
    status, snap = await api.call("POST", "/v1/snapshots", body)
    assert status == 201
    assert snap["ready_to_use"] is True and snap["size_bytes"] == GIB
    assert snap["source_volume_id"] == vol["id"]
    assert await api.call("POST", "/v1/snapshots", body) == (200, snap)
    other = await api.volume("other")
    status, problem = await api.call(
        "POST", "/v1/snapshots", {"name": "snap-1", "volume_id": other["id"]}
    )
    assert status == 409 and problem["code"] == "already_exists_with_different_parameters"
    assert await api.ok("GET", f"/v1/snapshots/{snap['id']}") == snap
    listed = await api.ok("GET", f"/v1/snapshots?volume_id={vol['id']}")
    assert listed["items"] == [snap]
    assert (await api.ok("GET", f"/v1/snapshots?volume_id={other['id']}"))["items"] == []
    assert (await api.ok("GET", "/v1/snapshots?name=snap-1"))["items"] == [snap]

    clone = await api.volume("clone", 2 * GIB, block_size=4096, source={"snapshot_id": snap["id"]})
    assert clone["source"] == {"snapshot_id": snap["id"]}
    status, problem = await api.call(
        "POST",
        "/v1/volumes",
        {
            "name": "tiny",
            "size_bytes": 4096,
            "block_size": 4096,
            "source": {"volume_id": vol["id"]},
        },
    )
    assert status == 400 and problem["code"] == "out_of_range"
    status, problem = await api.call(
        "POST",
        "/v1/volumes",
        {"name": "c2", "size_bytes": GIB, "source": {"volume_id": vol["id"]}},
    )
    assert status == 400 and problem["field"] == "block_size"
    status, problem = await api.call(
        "POST",
        "/v1/volumes",
        {"name": "c3", "size_bytes": GIB, "source": {"snapshot_id": "snap-0000000000000000"}},
    )
    assert status == 404 and problem["code"] == "source_not_found"

    # Decided (docs/etcd-schema.md): a volume with snapshots can be deleted; they stay.
    await api.ok("DELETE", f"/v1/volumes/{vol['id']}", status=204)
    assert await api.ok("GET", f"/v1/snapshots/{snap['id']}") == snap
    await api.ok("DELETE", f"/v1/snapshots/{snap['id']}", status=204)
    # A retried clone still answers with its volume after the source is gone.
    again = await api.volume("clone", 2 * GIB, block_size=4096, source={"snapshot_id": snap["id"]})
    assert again == clone
    await api.ok("DELETE", f"/v1/snapshots/{snap['id']}", status=204)
    status, problem = await api.call("GET", f"/v1/snapshots/{snap['id']}")
    assert status == 404 and problem["code"] == "snapshot_not_found"
    status, problem = await api.call(
        "POST", "/v1/snapshots", {"name": "s9", "volume_id": vol["id"]}
    )
    assert status == 404 and problem["code"] == "volume_not_found"


async def test_freed_luns_are_reused_lowest_first(api: Api) -> None:
    first, second = await api.volume("r1"), await api.volume("r2")
    assert (first["lun"], second["lun"]) == (1, 2)
    await api.ok("DELETE", f"/v1/volumes/{first['id']}", status=204)
    tomb = await api.etcd.get(Keys.gc_volume(first["id"]))  # written by the delete's txn
    assert tomb is not None
    deleted_at = tomb.mod_revision

    async def caught_up() -> bool:
        return api.luns.revision >= deleted_at

    await async_wait_for(caught_up, 10, "the LUN map to see the delete")
    third = await api.volume("r3")
    assert (third["target_iqn"], third["lun"]) == (first["target_iqn"], 1)
