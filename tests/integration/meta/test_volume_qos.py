"""Per-volume QoS limits through the REST API against a real etcd: set at creation, changed
online with PATCH, bad limits refused with the field named (docs/qos.md)."""

from __future__ import annotations

from typing import Any

import pytest

from lunastor.common.records import Keys, VolumeRecord
from tests.integration.meta.conftest import Api

GIB = 1 << 30


async def _stored(api: Api, volume_id: str) -> dict[str, Any]:
    kv = await api.etcd.get(Keys.volume(volume_id))
    assert kv is not None
    return VolumeRecord.from_json(kv.value).qos


async def test_limits_set_at_creation_are_stored_and_shown(api: Api) -> None:
    qos = {"write_iops": 500, "bps": 100 << 20, "bps_burst": 200 << 20, "burst_seconds": 10}
    vol = await api.volume("q-1", GIB, qos=qos)
    assert vol["qos"] == qos
    assert await _stored(api, vol["id"]) == qos
    plain = await api.volume("q-2", GIB)
    assert plain["qos"] == {} and await _stored(api, plain["id"]) == {}
    # limits change online, so a repeated create with other limits is the same volume
    status, again = await api.call("POST", "/v1/volumes", {"name": "q-1", "size_bytes": GIB})
    assert status == 200 and again["id"] == vol["id"] and again["qos"] == qos


async def test_patch_changes_and_clears_limits(api: Api) -> None:
    vol = await api.volume("q-3", GIB, qos={"iops": 1000})
    path = f"/v1/volumes/{vol['id']}"
    got = await api.ok("PATCH", path, {"qos": {"read_bps": 1 << 20}})
    assert got["qos"] == {"iops": 1000, "read_bps": 1 << 20}
    got = await api.ok("PATCH", path, {"qos": {"iops": None, "read_bps": 2 << 20}})
    assert got["qos"] == {"read_bps": 2 << 20}
    assert await _stored(api, vol["id"]) == {"read_bps": 2 << 20}
    got = await api.ok("PATCH", path, {"qos": {"read_bps": 0}})
    assert got["qos"] == {} and await _stored(api, vol["id"]) == {}
    assert (await api.ok("GET", path))["qos"] == {}
    # the csi role may change limits (CSI ControllerModifyVolume), a reader may not
    status, _ = await api.call("PATCH", path, {"qos": {"iops": 5}}, role="csi")
    assert status == 200
    status, _ = await api.call("PATCH", path, {"qos": {"iops": 6}}, role="reader")
    assert status == 403


@pytest.mark.parametrize(
    ("qos", "field"),
    [
        ({"iops": -1}, "qos"),
        ({"iops": "fast"}, "qos"),
        ({"iopz": 5}, "qos"),
        ({"iops_burst": 100}, "qos.iops_burst"),
        ({"iops": 100, "iops_burst": 50}, "qos.iops_burst"),
        ({"write_bps": 100, "burst_seconds": 3}, "qos.burst_seconds"),
    ],
)
async def test_bad_limits_are_refused_with_the_field(
    api: Api, qos: dict[str, Any], field: str
) -> None:
    status, problem = await api.call(
        "POST", "/v1/volumes", {"name": "q-bad", "size_bytes": GIB, "qos": qos}
    )
    assert status == 400, problem
    assert problem["field"].startswith(field), problem
    vol = await api.volume("q-ok", GIB, qos={"write_iops": 10})
    status, problem = await api.call("PATCH", f"/v1/volumes/{vol['id']}", {"qos": qos})
    assert status == 400 and problem["field"].startswith(field), problem
    assert await _stored(api, vol["id"]) == {"write_iops": 10}  # unchanged


async def test_patch_of_a_missing_volume_or_without_qos(api: Api) -> None:
    status, problem = await api.call("PATCH", "/v1/volumes/vol-0000000000000000", {"qos": {}})
    assert status == 404 and problem["code"] == "volume_not_found"
    vol = await api.volume("q-4", GIB)
    status, problem = await api.call("PATCH", f"/v1/volumes/{vol['id']}", {"size_bytes": GIB})
    assert status == 400
