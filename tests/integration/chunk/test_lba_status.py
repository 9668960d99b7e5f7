"""GET LBA STATUS on the replicated volume (docs/datapath.md, "GET LBA STATUS"): answered from
cached allocation maps, across extent boundaries, never stale after a write through another
access point; and through a real client (qemu-img map over its iSCSI driver)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

from lunastor.chunk.access.iscsi_server import IscsiServer, ServerConfig
from lunastor.chunk.access.volume import ReplicatedVolume
from lunastor.common.records import VolumeRecord
from lunastor.iscsi.blockdev import LbaState, LbaStatus
from lunastor.iscsi.scsi.target import LogicalUnit, ScsiTarget
from tests.integration.chunk import test_replication
from tests.integration.chunk.test_replication import EXTENT, Cluster
from tests.integration.test_iscsi_server import IQN, MemHost

cluster = test_replication.cluster  # the same real cluster fixture: three data nodes, etcd

M, D = LbaState.MAPPED, LbaState.DEALLOCATED
SECTORS = EXTENT // 512  # 512-byte LBAs per extent


def runs(status: Sequence[LbaStatus]) -> list[tuple[int, int, LbaState]]:
    return [(s.lba, s.blocks, s.state) for s in status]


def volume(c: Cluster, via: str, replicas: int, vid: str = "vol-t") -> ReplicatedVolume:
    record = VolumeRecord(
        id=vid, name=vid, size_bytes=4 * EXTENT, replicas=replicas, block_size=512
    )
    return ReplicatedVolume(record, c.nodes[via].path, EXTENT)


async def test_runs_continue_across_extent_boundaries(cluster: Cluster) -> None:
    v = volume(cluster, "chunk-0", 3)
    assert runs(await v.lba_status(0)) == [(0, 4 * SECTORS, D)]  # nothing allocated
    # mapped from the middle of extent 0 to the middle of extent 2; 4 KiB in extent 3
    await v.write(SECTORS // 2, bytes(range(256)) * 2 * (2 * SECTORS), fua=False)
    await v.write(3 * SECTORS + 8, b"\x01" * 4096, fua=False)
    want = [
        (0, SECTORS // 2, D),
        (SECTORS // 2, 2 * SECTORS, M),
        (5 * SECTORS // 2, SECTORS // 2 + 8, D),
        (3 * SECTORS + 8, 8, M),
        (3 * SECTORS + 16, SECTORS - 16, D),
    ]
    for cid in cluster.nodes:
        assert runs(await volume(cluster, cid, 3).lba_status(0)) == want, cid
    # from inside a run: the run from there on; an unaligned LBA inside a 4 KiB block too
    assert runs(await v.lba_status(SECTORS + 3))[0] == (SECTORS + 3, 3 * SECTORS // 2 - 3, M)
    assert runs(await v.lba_status(3 * SECTORS + 9))[:2] == [
        (3 * SECTORS + 9, 7, M),
        (3 * SECTORS + 16, SECTORS - 16, D),
    ]


async def test_a_cached_map_never_hides_a_write_through_another_access_point(
    cluster: Cluster,
) -> None:
    # a 1-replica volume: one access point is the member (its map from its own replica), the
    # others are not (their maps from the primary's array, re-validated by its state)
    v0 = volume(cluster, "chunk-0", 1)
    await v0.write(0, b"\x07" * 4096, fua=False)
    rec = cluster.nodes["chunk-0"].emap.get("vol-t", 0)
    assert rec is not None and len(rec.replicas) == 1
    for cid in cluster.nodes:
        v = volume(cluster, cid, 1)
        assert runs(await v.lba_status(0))[:2] == [(0, 8, M), (8, 4 * SECTORS - 8, D)]
        await v.lba_status(0)  # (a member's first call opens its replica: the next is local)
        builds = v.path.allocations.builds
        assert runs(await v.lba_status(0))[:2] == [(0, 8, M), (8, 4 * SECTORS - 8, D)]
        assert v.path.allocations.builds == builds  # answered from the cached map
        writer = volume(cluster, next(c for c in cluster.nodes if c != cid), 1)
        await writer.write(16, b"\x08" * 4096, fua=False)
        assert runs(await v.lba_status(0))[:3] == [(0, 8, M), (8, 8, D), (16, 8, M)], cid
        await writer.unmap([(16, 8)])
        assert runs(await v.lba_status(0))[:2] == [(0, 8, M), (8, 4 * SECTORS - 8, D)], cid


async def test_qemu_img_map_through_the_iscsi_driver(cluster: Cluster) -> None:
    v = volume(cluster, "chunk-1", 3)
    await v.write(SECTORS // 2, b"\x11" * EXTENT, fua=False)  # across the first boundary
    await v.write(3 * SECTORS, b"\x22" * 8192, fua=False)
    lu = LogicalUnit(v, naa_id=0x6 << 124 | 7, serial="vol-t")
    srv = IscsiServer(MemHost(ScsiTarget(IQN, {0: lu})), ServerConfig(listen=[("127.0.0.1", 0)]))
    await srv.start()
    try:
        port = srv.addresses[0][1]
        proc = await asyncio.create_subprocess_exec(
            "qemu-img",
            "map",
            "-f",
            "raw",
            "--output=json",
            f"iscsi://127.0.0.1:{port}/{IQN}/0",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        await srv.close()
    assert proc.returncode == 0, err
    got = [(r["start"], r["length"], r["data"]) for r in json.loads(out)]
    assert got == [
        (0, EXTENT // 2, False),
        (EXTENT // 2, EXTENT, True),
        (3 * EXTENT // 2, 3 * EXTENT // 2, False),
        (3 * EXTENT, 8192, True),
        (3 * EXTENT + 8192, EXTENT - 8192, False),
    ], got
