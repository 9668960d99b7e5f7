"""A publish, unpublish or delete right after this meta instance's own commit of the volume
skips the read (`Store._known`): one etcd round trip instead of two. Counted by etcd itself
(its gRPC server metrics), against the session's real etcd; and a second meta instance on the
same etcd makes the first one's remembered state stale, which the commit's compares catch
(the answer is what etcd holds, never what the instance remembered)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from lunastor.common.records import Keys, LunRecord, VolumeRecord
from tests.integration.meta.conftest import Api, meta_config, start_api
from tests.support.etcd import EtcdServer

A = "iqn.2020-01.org.example:node-a"
B = "iqn.2020-01.org.example:node-b"
C = "iqn.2020-01.org.example:node-c"


@pytest.fixture
async def other(etcd_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[Api]:
    """A second meta instance on the same etcd and namespace."""
    client, etcd, luns = await start_api(meta_config(etcd_server, etcd_prefix))
    yield Api(client, etcd, luns)
    await client.close()
    await luns.stop()
    await etcd.close()


async def test_after_our_own_commit_each_call_is_one_round_trip(
    api: Api, other: Api, etcd_server: EtcdServer
) -> None:
    vol = await api.volume("known")
    exports = f"/v1/volumes/{vol['id']}/exports"
    calls = []
    for method, path, body, status in (
        ("POST", exports, {"initiator": A}, 201),  # create+publish: the CSI pattern
        ("DELETE", f"{exports}/{A}", None, 204),
        ("DELETE", f"/v1/volumes/{vol['id']}", None, 204),
    ):
        before = etcd_server.kv_requests()
        await api.ok(method, path, body, status=status)
        calls.append(etcd_server.kv_requests() - before)
    assert calls == [1, 1, 1]
    # an instance that did not commit the volume itself reads it first
    vol = await api.volume("known-2")
    before = etcd_server.kv_requests()
    await other.ok("POST", f"/v1/volumes/{vol['id']}/exports", {"initiator": A}, status=201)
    assert etcd_server.kv_requests() - before >= 2  # a read (volume and LUN), then the commit


async def test_a_stale_remembered_state_is_caught_by_the_compares(api: Api, other: Api) -> None:
    vol = await api.volume("stale")
    exports = f"/v1/volumes/{vol['id']}/exports"
    record = await api.etcd.get(Keys.volume(vol["id"]))
    assert record is not None
    lun_key = Keys.lun(VolumeRecord.from_json(record.value).target, vol["lun"])

    async def initiators() -> list[str]:
        kv = await api.etcd.get(lun_key)
        assert kv is not None
        return LunRecord.from_json(kv.value).initiators

    # `api` remembers the LUN without initiators; `other` publishes meanwhile
    await other.ok("POST", exports, {"initiator": A}, status=201)
    await api.ok("POST", exports, {"initiator": B}, status=201)
    assert await initiators() == [A, B]  # A not lost to api's stale state
    # `api` remembers [A, B]; `other` unpublishes both and publishes C
    await other.ok("DELETE", f"{exports}/{A}", status=204)
    await other.ok("DELETE", f"{exports}/{B}", status=204)
    await other.ok("POST", exports, {"initiator": C}, status=201)
    await api.ok("DELETE", f"{exports}/{B}", status=204)  # already gone: nothing to do
    assert await initiators() == [C]
    # `api` remembers nothing now; a fresh volume: it remembers it unexported
    vol2 = await api.volume("stale-2")
    await other.ok("POST", f"/v1/volumes/{vol2['id']}/exports", {"initiator": A}, status=201)
    status, problem = await api.call("DELETE", f"/v1/volumes/{vol2['id']}")
    assert status == 409 and problem["code"] == "volume_in_use"  # not deleted under an export
    # an export through `api` of a volume `other` deleted: 404, whatever it remembered
    vol3 = await api.volume("stale-3")
    await other.ok("DELETE", f"/v1/volumes/{vol3['id']}", status=204)
    status, problem = await api.call("POST", f"/v1/volumes/{vol3['id']}/exports", {"initiator": A})
    assert status == 404 and problem["code"] == "volume_not_found"
