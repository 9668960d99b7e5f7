"""The exports read model follows what the meta service writes, in a real etcd."""

from __future__ import annotations

from lunastor.common.etcd import Etcd
from lunastor.common.exports import ChapSecrets, Exports
from lunastor.common.sealing import Sealer
from lunastor.common.settings import etcd_client_config
from tests.integration.meta.conftest import SECRET_KEY, meta_config, start_api
from tests.support.etcd import EtcdServer

NODE1 = "iqn.1994-05.com.redhat:node-1"
NODE2 = "iqn.1994-05.com.redhat:node-2"
TIMEOUT = 10.0


async def test_exports_follow_publish_unpublish_and_chap(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    config = meta_config(etcd_server, etcd_prefix)
    client, meta_etcd, luns = await start_api(config)
    headers = {"Authorization": "Bearer admin-t"}

    async def call(method: str, path: str, body: object = None, status: int = 200) -> object:
        resp = await client.request(method, path, json=body, headers=headers)
        assert resp.status == status, await resp.text()
        return await resp.json() if resp.status != 204 else None

    etcd = await Etcd.connect(etcd_client_config(config.etcd))
    try:
        async with Exports(etcd, Sealer(SECRET_KEY)) as exports:
            assert exports.index.visible_targets(NODE1) == []
            vol1 = await call("POST", "/v1/volumes", {"name": "v1", "size_bytes": 1 << 20}, 201)
            vol2 = await call("POST", "/v1/volumes", {"name": "v2", "size_bytes": 1 << 20}, 201)
            assert isinstance(vol1, dict) and isinstance(vol2, dict)
            target = vol1["target_iqn"]
            await exports.wait_for(lambda i: i.target_exists(target), TIMEOUT)
            # created but published to nobody: the target exists, nobody sees it
            assert exports.index.visible_targets(NODE1) == []
            assert not exports.index.may_see(NODE1, target)

            await call("POST", f"/v1/volumes/{vol1['id']}/exports", {"initiator": NODE1}, 201)
            await exports.wait_for(lambda i: i.may_see(NODE1, target), TIMEOUT)
            assert exports.index.visible_targets(NODE1) == [target]
            assert exports.index.visible_luns(NODE1, target) == {vol1["lun"]: vol1["id"]}
            assert exports.index.visible_targets(NODE2) == []

            chap = {"user": "alice", "secret": "s3cret-s3cret!"}
            await call("PUT", f"/v1/targets/{target}/chap", chap)
            await call("PUT", "/v1/discovery-chap", {**chap, "user": "disc"})
            await exports.wait_for(
                lambda i: i.target_chap(target) is not None and i.discovery_chap() is not None,
                TIMEOUT,
            )
            assert exports.index.target_chap(target) == ChapSecrets("alice", b"s3cret-s3cret!")
            assert exports.index.discovery_chap() == ChapSecrets("disc", b"s3cret-s3cret!")

            await call("DELETE", f"/v1/volumes/{vol1['id']}/exports/{NODE1}", status=204)
            await call("DELETE", "/v1/discovery-chap", status=204)
            await exports.wait_for(
                lambda i: not i.may_see(NODE1, target) and i.discovery_chap() is None, TIMEOUT
            )
            assert exports.index.visible_targets(NODE1) == []
            assert exports.index.bad_records == []
    finally:
        await etcd.close()
        await client.close()
        await luns.stop()
        await meta_etcd.close()
