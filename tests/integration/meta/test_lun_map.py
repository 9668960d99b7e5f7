"""Meta's LUN map (`lunastor/meta/luns.py`) drops the LUNs its instance deletes and follows
other instances' deletions (only) while another instance is live; LUNs another meta instance
created are learnt by the first create that trips over one, in that create's failed
transaction. Against the session's real etcd, two instances on one namespace."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from lunastor.common.etcd import Delete, Etcd, Put
from lunastor.common.records import Keys
from lunastor.common.settings import etcd_client_config
from lunastor.meta.luns import LunMap
from tests.integration.meta.conftest import Api, meta_config, running_api
from tests.support.etcd import EtcdServer
from tests.support.procs import async_wait_for

A = "iqn.2020-01.org.example:node-a"


@pytest.fixture
async def other(etcd_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[Api]:
    """A second meta instance on the same etcd and namespace."""
    async with running_api(meta_config(etcd_server, etcd_prefix)) as instance:
        yield instance


async def test_the_watch_carries_deletions_only(api: Api) -> None:
    """Publishes and unpublishes rewrite the LUN record (its ACL) and creates add one: none of
    them reaches the map's watch; the delete does (a freed LUN is reused lowest first)."""
    first = await api.volume("w1")
    exports = f"/v1/volumes/{first['id']}/exports"
    await api.ok("POST", exports, {"initiator": A}, status=201)
    await api.ok("DELETE", f"{exports}/{A}", status=204)
    await api.volume("w2")
    await api.ok("DELETE", f"/v1/volumes/{first['id']}", status=204)
    tomb = await api.etcd.get(Keys.gc_volume(first["id"]))
    assert tomb is not None

    async def caught_up() -> bool:
        return api.luns.revision >= tomb.mod_revision

    await async_wait_for(caught_up, 10, "the LUN map to see the delete")
    assert api.luns.events == 1
    assert (await api.volume("w3"))["lun"] == first["lun"]


async def test_luns_another_instance_created_are_learnt_in_one_failed_attempt(
    api: Api, other: Api, etcd_server: EtcdServer
) -> None:
    # more than a create's 64 attempts: learning one LUN per failed attempt would give up
    made = [await other.volume(f"o{i}") for i in range(70)]
    assert [v["lun"] for v in made] == list(range(1, 71))
    before = etcd_server.kv_requests()
    mine = await api.volume("mine")
    assert (mine["target_iqn"], mine["lun"]) == (made[0]["target_iqn"], 71)
    # the failed create (reads the target), then ours
    assert etcd_server.kv_requests() - before == 2
    before = etcd_server.kv_requests()
    assert (await api.volume("mine-2"))["lun"] == 72
    assert etcd_server.kv_requests() - before == 1  # learnt: no collision


async def test_alone_an_instance_needs_no_watch_until_another_one_is_live(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """Alone, every deletion is the instance's own: it frees the LUN at once, with no watch
    (one gRPC message per deletion was ~9% of meta's CPU under churn). Another instance
    registering starts the deletions watch, after a fresh read of the map: a deletion the
    newcomer made at once is not missed either."""
    config = meta_config(etcd_server, etcd_prefix)
    async with await Etcd.connect(etcd_client_config(config.etcd)) as setup:
        await setup.put(Keys.LIVE_META + "meta-a", b"{}")  # its own live record, as main puts
    async with running_api(config, "meta-a") as api:
        etcd, luns = api.etcd, api.luns
        w1, w2, w3 = [await api.volume(f"w{i}") for i in (1, 2, 3)]
        await api.ok("DELETE", f"/v1/volumes/{w1['id']}", status=204)
        assert (await api.volume("again"))["lun"] == w1["lun"]  # freed at once, lowest first
        assert (luns.events, luns.following) == (0, False)

        # another instance registers and deletes w2's LUN in the same transaction
        w2_key = Keys.lun(luns_target(w2), w2["lun"])
        await etcd.txn([], [Put(Keys.LIVE_META + "meta-b", b"{}"), Delete(w2_key)])

        async def following() -> bool:
            return luns.following

        await async_wait_for(following, 10, "the LUN map to follow deletions")
        assert w2["lun"] not in luns.used[luns_target(w2)]  # the fresh read saw it go
        await etcd.delete(Keys.lun(luns_target(w3), w3["lun"]))  # the peer deletes another

        async def gone() -> bool:
            return w3["lun"] not in luns.used[luns_target(w3)]

        await async_wait_for(gone, 10, "the LUN map to see the peer's deletion")
        assert luns.events >= 1


async def test_another_instance_live_at_start_is_followed_from_the_start(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    config = meta_config(etcd_server, etcd_prefix)
    etcd = await Etcd.connect(etcd_client_config(config.etcd))
    await etcd.put(Keys.LIVE_META + "meta-b", b"{}")
    luns = await LunMap(etcd, "meta-a").start()
    try:

        async def following() -> bool:
            return luns.following

        await async_wait_for(following, 10, "the LUN map to follow deletions")
    finally:
        await luns.stop()
        await etcd.close()


def luns_target(volume: dict[str, object]) -> int:
    """The target number of a volume's `target_iqn` (`...:tgt-<n>`)."""
    return int(str(volume["target_iqn"]).rpartition("-")[2])
