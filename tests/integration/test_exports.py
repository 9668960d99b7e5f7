"""The exports read model follows what the meta service writes, in a real etcd."""

from __future__ import annotations

import dataclasses

from lunastor.common.etcd import Etcd
from lunastor.common.exports import ChapSecrets, Exports
from lunastor.common.sealing import Sealer
from lunastor.common.settings import etcd_client_config
from lunastor.redirector.portal import PortalServer, RedirectPolicy
from lunastor.redirector.servers import ServerTable
from tests.integration.meta.conftest import SECRET_KEY, meta_config, start_api
from tests.integration.tcp_proxy import TcpProxy
from tests.support.etcd import EtcdServer
from tests.unit.test_redirector_portal import live, login_once, normal

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


async def test_a_portal_login_right_after_an_export_is_redirected_though_the_watch_lags(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """The redirector's portal answers a login that comes as soon as meta answered the create
    and the export, though its views learn of them late (here etcd's replies to it arrive
    1.5 s late): "Target not found" and "Authorization failure" are decided only once the
    views caught up with etcd; what etcd does not allow is still refused."""
    config = meta_config(etcd_server, etcd_prefix)
    client, meta_etcd, luns = await start_api(config)
    headers = {"Authorization": "Bearer admin-t"}

    async def call(method: str, path: str, body: object, status: int) -> dict[str, object]:
        resp = await client.request(method, path, json=body, headers=headers)
        assert resp.status == status, await resp.text()
        answer = await resp.json()
        assert isinstance(answer, dict)
        return answer

    proxy = await TcpProxy(etcd_server.endpoint).start()
    behind = dataclasses.replace(etcd_client_config(config.etcd), endpoints=[proxy.endpoint])
    etcd = await Etcd.connect(behind)
    try:
        async with Exports(etcd, Sealer(SECRET_KEY)) as exports:
            table = ServerTable.build([live("c1", "10.0.0.1:3260")], [])
            policy = RedirectPolicy(lambda: exports.index, lambda: table, "10.0.0.100:3260")
            portal = PortalServer(policy, catch_up=lambda: exports.catch_up(TIMEOUT))
            await portal.start("127.0.0.1", 0)
            port = portal.addresses[0][1]
            try:
                proxy.reply_delay = 1.5
                body = {"name": "v1", "size_bytes": 1 << 20}
                vol = await call("POST", "/v1/volumes", body, 201)
                await call("POST", f"/v1/volumes/{vol['id']}/exports", {"initiator": NODE1}, 201)
                target = str(vol["target_iqn"])
                assert not exports.index.target_exists(target)  # the views lag
                resp = await login_once(port, normal(NODE1, target))
                assert (resp.status_class, resp.status_detail) == (1, 1)  # redirected
                # the target is known now; a second volume on it, exported to another node
                vol = await call("POST", "/v1/volumes", {"name": "v2", "size_bytes": 1 << 20}, 201)
                await call("POST", f"/v1/volumes/{vol['id']}/exports", {"initiator": NODE2}, 201)
                assert vol["target_iqn"] == target and not exports.index.may_see(NODE2, target)
                resp = await login_once(port, normal(NODE2, target))
                assert (resp.status_class, resp.status_detail) == (1, 1)
                resp = await login_once(port, normal("iqn.1994-05.com.redhat:node-3", target))
                assert (resp.status_class, resp.status_detail) == (2, 2)  # not authorized
            finally:
                await portal.close()
    finally:
        await etcd.close()
        await proxy.stop()
        await client.close()
        await luns.stop()
        await meta_etcd.close()
