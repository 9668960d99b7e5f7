"""The access point's local read fast path (docs/datapath.md, "Local reads") against real data
nodes and a real etcd: it serves members' reads from their own replica, and it keeps every
rule of the general path: the read lease, the generation, converging extents, bad blocks."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from lunastor.chunk.access.iscsi_server import IscsiServer, ServerConfig
from lunastor.chunk.access.volume import ReplicatedVolume
from lunastor.chunk.store import BLOCK_SIZE
from lunastor.common.records import VolumeRecord
from lunastor.iscsi.blockdev import LbaState, NotReady
from lunastor.iscsi.buffers import BufferPool
from lunastor.iscsi.scsi.target import LogicalUnit, ScsiTarget
from tests.integration.chunk import test_replication
from tests.integration.chunk.test_replication import EXTENT, Cluster, blocks
from tests.integration.test_iscsi_server import IQN, MemHost

cluster = test_replication.cluster  # the same real cluster fixture: three data nodes, etcd


def local_reads() -> float:
    return REGISTRY.get_sample_value("lunastor_local_reads_total") or 0.0


async def locally(v: ReplicatedVolume, lba: int, n: int, want: bytes) -> bool:
    """Whether a read of these blocks is served on the fast path (right data every time). A
    few tries: on a loaded machine a secondary's read lease may lapse for a moment, and then
    the fast path rightly hands the read on."""
    for _ in range(5):
        before = local_reads()
        assert bytes(await v.read(lba, n)) == want
        if local_reads() == before + 1:
            return True
        await asyncio.sleep(0.2)
    return False


async def test_every_member_serves_reads_from_its_own_replica(cluster: Cluster) -> None:
    v = cluster.volume("chunk-0")
    data = os.urandom(2 * EXTENT)
    await v.write(0, data, fua=False)
    await v.write(7, b"\x5a" * 512, fua=False)  # a sub-block write: 512-byte LBAs
    want = bytearray(data)
    want[7 * 512 : 8 * 512] = b"\x5a" * 512
    for cid in cluster.nodes:
        via = cluster.volume(cid)
        await via.read(0, 8)  # the first read of an extent opens the replica
        for lba, n in ((0, 8), (1, 3), (7, 1), (6, 9), (2040, 8), (1000, 1048)):
            expected = bytes(want[lba * 512 : (lba + n) * 512])
            assert await locally(via, lba, n, expected), (cid, lba, n)
    # a read across the extent boundary goes the general way, and is still right
    boundary = EXTENT // 512
    assert await v.read(boundary - 4, 8) == bytes(want[(boundary - 4) * 512 : (boundary + 4) * 512])


async def test_a_server_whose_map_lags_an_allocation_still_reads_and_unmaps_the_data(
    cluster: Cluster,
) -> None:
    """An access point whose watch has not delivered an extent's allocation (CI met it under
    load: a read through another server answered zeros for acknowledged data) must not take
    "not in my map" for "never written". The volume's stream is stopped at a server that is
    not the extents' member (a 1-replica volume) to make the lag certain; etcd is asked."""
    record = VolumeRecord(id="vol-1", name="vol-1", size_bytes=4 * EXTENT, replicas=1)
    ring = await cluster.nodes["chunk-0"].emap.ring(1)
    members = {m for index in (0, 1) for m in ring.place("vol-1", index)}
    via = next(cid for cid in cluster.nodes if cid not in members)
    lagging = ReplicatedVolume(record, cluster.nodes[via].path, EXTENT)
    writer = ReplicatedVolume(record, cluster.nodes[next(iter(members))].path, EXTENT)
    assert await lagging.read(0, 8) == bytes(4096)  # loads the volume's family there
    await cluster.nodes[via].emap.extents._families["vol-1"].stop()
    await writer.write(0, blocks(1, 8), fua=False)
    await writer.write(EXTENT // 512, blocks(2, 8), fua=False)  # a second extent
    assert cluster.nodes[via].emap.get("vol-1", 0) is None  # its map has not seen them
    assert await lagging.read(0, 8) == blocks(1, 8)
    assert await lagging.read(EXTENT // 512 - 8, 16) == bytes(4096) + blocks(2, 8)
    status = [(s.lba, s.blocks, s.state) for s in await lagging.lba_status(0)]
    assert status[:3] == [
        (0, 8, LbaState.MAPPED),
        (8, EXTENT // 512 - 8, LbaState.DEALLOCATED),
        (EXTENT // 512, 8, LbaState.MAPPED),
    ]
    await lagging.unmap([(0, 8)])  # reaches the extent its map does not show
    assert await writer.read(0, 8) == bytes(4096)


async def test_unwritten_blocks_of_a_written_extent_read_as_zeros_locally(cluster: Cluster) -> None:
    v = cluster.volume("chunk-1")
    await v.write(16, b"\x11" * 4096, fua=False)
    await v.read(0, 8)  # opens the replica
    assert await locally(v, 0, 32, bytes(16 * 512) + b"\x11" * 4096 + bytes(8 * 512))
    await v.unmap([(16, 8)])
    assert bytes(await v.read(0, 32)) == bytes(32 * 512)


async def test_a_local_bad_block_goes_the_general_way_and_is_repaired(cluster: Cluster) -> None:
    v = cluster.volume("chunk-2")
    data = os.urandom(64 * 1024)
    await v.write(0, data, fua=True)
    assert await v.read(0, 8) == data[:4096]  # opens the replica
    replica = await cluster.nodes["chunk-2"].store.open("vol-t", 0)
    with open(replica.paths.data, "r+b") as f:
        f.seek(BLOCK_SIZE * 2)
        f.write(b"\xff" * 100)
    repairs = REGISTRY.get_sample_value("lunastor_checksum_repairs_total") or 0.0
    before = local_reads()
    assert await v.read(0, len(data) // 512) == data  # never the bad bytes
    assert local_reads() == before  # the fast path handed it on
    assert (REGISTRY.get_sample_value("lunastor_checksum_repairs_total") or 0.0) == repairs + 1
    assert await locally(v, 0, len(data) // 512, data)  # repaired: local again


async def test_a_member_whose_map_lags_and_whose_read_lease_ran_out_never_reads_old_data(
    cluster: Cluster,
) -> None:
    # The member is cut off from its primary and its extent map stopped following etcd: the
    # map still names it a member at the old generation, and its replica is at that generation
    # too. Only the read lease tells it that it may have missed writes. The fast path must
    # hand the read on (the general path then finds no current member to read and times out);
    # it must never return the data the member holds.
    v = cluster.volume("chunk-0")
    await v.write(0, blocks(1, 8), fua=False)
    rec = cluster.nodes["chunk-0"].emap.get("vol-t", 0)
    assert rec is not None
    cut = rec.replicas[1]
    primary = cluster.nodes[rec.primary]
    secondary = cluster.nodes[cut]
    stale = cluster.volume(cut)
    assert await stale.read(0, 8) == blocks(1, 8)  # opens the replica
    assert await locally(stale, 0, 8, blocks(1, 8))  # served locally while it holds the lease
    await secondary.emap.extents.stop()  # its map stops here
    dead = cluster.cut(rec.primary, cut)
    try:
        via = cluster.volume(next(c for c in cluster.nodes if c not in (cut,)))
        await via.write(0, blocks(2, 8), fua=False)  # acknowledged once the member is removed
        after = primary.emap.get("vol-t", 0)
        assert after is not None and cut not in after.replicas
        lagging = secondary.emap.get("vol-t", 0)
        assert lagging is not None and lagging.gen == rec.gen and cut in lagging.replicas
        secondary.path.io_timeout = 2.0
        before = local_reads()
        try:
            got = await stale.read(0, 8)
        except NotReady:
            got = None
        assert got is None or bytes(got) == blocks(2, 8)
        assert local_reads() == before
    finally:
        await dead.close()


async def test_a_converging_extent_is_not_read_locally(
    cluster: Cluster,
) -> None:
    v = cluster.volume("chunk-0")
    await v.write(0, blocks(3, 8), fua=False)
    rec = cluster.nodes["chunk-0"].emap.get("vol-t", 0)
    assert rec is not None
    member = cluster.nodes[rec.replicas[1]]
    via = cluster.volume(member.id)
    assert await via.read(0, 8) == blocks(3, 8)  # opens the replica
    assert await locally(via, 0, 8, blocks(3, 8))
    # the map says converging: reads go to the primary only
    entry = member.emap.entry("vol-t", 0)
    assert entry is not None
    converging = dataclasses.replace(entry.record, converging=True)
    assert await member.emap.replace(entry, converging) is not None
    await member.emap.extents.wait_for(
        lambda _: (r := member.emap.get("vol-t", 0)) is not None and r.converging, 5
    )
    before = local_reads()
    # (the general path converges the extent itself, then reads)
    assert await via.read(0, 8) == blocks(3, 8)
    assert local_reads() == before
    await via.write(0, blocks(4, 8), fua=False)  # a write converges the extent first
    await member.emap.extents.wait_for(
        lambda _: (r := member.emap.get("vol-t", 0)) is not None and not r.converging, 5
    )
    assert await locally(via, 0, 8, blocks(4, 8))


@pytest.mark.parametrize("size", [4096, 5000, 65536, 1 << 20, 9 << 20])
def test_the_buffer_pool_reuses_a_buffer_only_once_nothing_refers_to_it(size: int) -> None:
    pool = BufferPool(max_pooled=8 << 20, per_class=2)  # as local reads use it
    a = pool.take(size)
    assert len(a) >= size
    held = memoryview(a)[:10]
    b = pool.take(size)
    assert b is not a  # `a` is still referred to
    held.release()
    del held
    if size <= 8 << 20:
        assert pool.take(size) is a
    else:
        assert pool.take(size) is not a  # too large to pool


async def test_local_reads_are_answered_inline_by_the_iscsi_fast_path(
    cluster: Cluster, tmp_path: Path
) -> None:
    # qemu-img writes an image through the in-process iSCSI server (writes are replicated:
    # never inline) and reads it back (its 2 MiB reads span two extents: the full path);
    # qemu-io's 4 KiB reads of an extent held here are answered inline
    v = cluster.volume("chunk-1")
    image = tmp_path / "in.raw"
    image.write_bytes(os.urandom(2 * EXTENT))
    lu = LogicalUnit(v, naa_id=0x6 << 124 | 9, serial="vol-t")
    srv = IscsiServer(MemHost(ScsiTarget(IQN, {0: lu})), ServerConfig(listen=[("127.0.0.1", 0)]))
    await srv.start()
    seen: dict[int, Any] = {}  # every connection ever open: closed ones keep their counts

    def fast() -> int:
        return sum(c.conn.fast_commands for c in seen.values())

    async def sample() -> None:
        while True:
            seen.update((id(c), c) for c in srv.connections)
            await asyncio.sleep(0.001)

    async def qemu_img(*args: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err

    url = f"iscsi://127.0.0.1:{srv.addresses[0][1]}/{IQN}/0"
    sampler = asyncio.create_task(sample())
    try:
        await qemu_img("convert", "-n", "-f", "raw", "-O", "raw", str(image), url)
        assert fast() == 0  # no write went inline
        await v.read(0, 8)  # opens the replicas of both extents
        await v.read(EXTENT // 512, 8)
        before = local_reads()
        await qemu_img("convert", "-f", "raw", "-O", "raw", url, str(tmp_path / "out.raw"))
        # QD1 reads, one at a time (qemu-io): the fast path's plainest case
        reads = [a for i in range(16) for a in ("-c", f"read {i * 4096} 4096")]
        proc = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", *reads, url, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert out.count(b"read 4096/4096 bytes") == 16, out
    finally:
        sampler.cancel()
        await srv.close()
    back = (tmp_path / "out.raw").read_bytes()  # the volume's 4 extents: 2 written, 2 zeros
    assert back[: 2 * EXTENT] == image.read_bytes() and back[2 * EXTENT :] == bytes(2 * EXTENT)
    assert fast() > 0 and local_reads() > before
