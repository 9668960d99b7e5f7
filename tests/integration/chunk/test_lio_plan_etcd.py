"""What the LIO export would configure, from a real etcd: LUN map, ACLs and CHAP to a LioPlan,
and each change in etcd reaching the exporter (`EtcdTargetHost.on_rebuild`). LIO itself runs
only in the kernel guest (tests/kernel/lio.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from lunastor.chunk.access.lio.exporter import LioExporter
from lunastor.chunk.access.lio.plan import Acl
from lunastor.chunk.access.targets import EtcdTargetHost
from lunastor.chunk.access.volume import AccessPath
from lunastor.chunk.replication.extentmap import ExtentMap
from lunastor.chunk.replication.node import Replicas
from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.records import Keys, LunRecord, TargetRecord, VolumeRecord, target_iqn
from lunastor.common.sealing import Sealer
from lunastor.iscsi.chap import ChapCredentials
from tests.support.etcd import EtcdServer
from tests.support.procs import async_wait_for

KEY = "sealing-key-for-tests-0123456789"
A, B = "iqn.2026-11.test:a", "iqn.2026-11.test:b"
PORTALS = [("192.168.77.2", 3260)]


@pytest.fixture
async def etcd(etcd_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[Etcd]:
    config = EtcdConfig(endpoints=[etcd_server.endpoint], namespace=etcd_prefix, timeout=5)
    async with await Etcd.connect(config) as client:
        yield client


async def put_lun(etcd: Etcd, vid: str, target: int, lun: int, initiators: list[str]) -> None:
    vol = VolumeRecord(id=vid, name=vid, size_bytes=8 << 20, target=target, lun=lun)
    await etcd.put(Keys.volume(vid), vol.to_json())
    await etcd.put(Keys.lun(target, lun), LunRecord(volume_id=vid, initiators=initiators).to_json())


async def test_plan_follows_luns_acls_and_chap(etcd: Etcd) -> None:
    emap = ExtentMap(etcd)
    path = AccessPath(emap, Replicas(emap, b"x" * 16, "lio"), "lio", lease_ttl=2)
    sealer = Sealer(KEY)
    host = EtcdTargetHost(
        etcd, path, 1 << 20, relative_port=lambda: 4, relative_ports=lambda: [4], sealer=sealer
    )
    await put_lun(etcd, "vol-a", 0, 1, [A, B])
    await put_lun(etcd, "vol-b", 0, 2, [B])
    chap = {"user": "u", "secret": sealer.seal("s3cret-s3cret-16")}
    await etcd.put(Keys.target(0), TargetRecord(target=0, chap=chap).to_json())
    await host.start()
    exporter = LioExporter(host, PORTALS, 4)  # no rtslib needed to plan
    seen: list[int] = []
    host.on_rebuild.append(lambda: seen.append(host.changes))
    try:
        plan = exporter.current_plan()
        creds = ChapCredentials("u", b"s3cret-s3cret-16")
        t0 = plan.targets[target_iqn(0)]
        assert t0.luns == {1: "lunastor-vol-a", 2: "lunastor-vol-b"}
        assert t0.acls == (Acl(A, (1,), creds), Acl(B, (1, 2), creds))
        assert t0.authentication
        assert plan.backstores["lunastor-vol-a"].config == "lunastor/vol-a"
        assert plan.backstores["lunastor-vol-a"].size == 8 << 20

        # an ACL change, a new target and CHAP removed all reach the plan
        await put_lun(etcd, "vol-b", 0, 2, [A])
        await put_lun(etcd, "vol-c", 1, 1, [B])
        await etcd.delete(Keys.target(0))

        async def settled() -> bool:
            p = exporter.current_plan()
            t = p.targets.get(target_iqn(0))
            return (
                t is not None
                and t.acls == (Acl(A, (1, 2)), Acl(B, (1,)))
                and not t.authentication
                and target_iqn(1) in p.targets
            )

        await async_wait_for(settled, 10, "the plan to follow etcd")
        assert seen, "on_rebuild listeners were not called"
        await etcd.delete(Keys.lun(0, 1))

        async def unexported() -> bool:
            return "lunastor-vol-a" not in exporter.current_plan().backstores

        await async_wait_for(unexported, 10, "vol-a's backstore to leave the plan")
    finally:
        await host.stop()
