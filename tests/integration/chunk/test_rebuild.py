"""Re-replication, catch-up and drain with real parts in one process (real etcd, data nodes on
real sockets; the cluster of test_replication.py): a member joins while writes continue
(lunastor/chunk/replication/join.py), driven by each server's repair loop
(lunastor/chunk/maintenance/repair.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from lunastor.chunk.access.volume import ReplicatedVolume
from lunastor.chunk.maintenance.repair import Repairer
from lunastor.chunk.maintenance.repair_plan import ActionKind
from lunastor.chunk.replication.join import Throttle, join_member
from lunastor.chunk.store import ReplicaNotFound
from lunastor.chunk.wire.server import DataServer
from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.extent_pages import extent_keys, extent_records, read_keys
from lunastor.common.records import (
    ChunkAdminRecord,
    ChunkServerInfo,
    ChunkServerStatus,
    ExtentRecord,
    Keys,
    OperationRecord,
    VolumeRecord,
)
from lunastor.meta.planners import DrainPlanner, RebuildPlanner
from tests.integration.chunk.test_replication import EXTENT, SECRET, Cluster
from tests.support.etcd import EtcdServer

VID = "vol-r"
SECTOR = 512


class Rig:
    """The in-process cluster plus a repair loop per node, run one pass at a time."""

    def __init__(self, cluster: Cluster, replace_after: float) -> None:
        self.c = cluster
        self.replace_after = replace_after
        self.repairers: dict[str, Repairer] = {}

    async def start(self) -> None:
        for cid, n in self.c.nodes.items():
            self.repairers[cid] = await Repairer(
                self.c.etcd,
                n.emap,
                n.node,
                n.path,
                replace_after=self.replace_after,
                rebuild_rate=256 << 20,
                concurrency=2,
                interval=1,
            ).start(loop_forever=False)

    async def stop(self) -> None:
        for r in self.repairers.values():
            await r.stop()

    async def volume(
        self, via: str, extents: int, replicas: int = 3, zones: list[str] | None = None
    ) -> ReplicatedVolume:
        size = extents * EXTENT
        record = VolumeRecord(
            id=VID, name=VID, size_bytes=size, replicas=replicas, zones=zones or []
        )
        await self.c.etcd.put(Keys.volume(VID), record.to_json())
        for r in self.repairers.values():
            await r.volumes.wait_for(lambda c: Keys.volume(VID) in c.items, 10)
        return ReplicatedVolume(record, self.c.nodes[via].path, EXTENT)

    def record(self, index: int) -> ExtentRecord:
        rec = next(iter(self.c.nodes.values())).emap.get(VID, index)
        assert rec is not None
        return rec

    async def fresh(self, index: int) -> ExtentRecord:
        found, _ = await read_keys(self.c.etcd, extent_keys(VID, index))
        recs = [r for kv in found.values() if kv for r in extent_records([kv]) if r.index == index]
        assert recs
        return recs[0]

    async def pass_(self) -> None:
        """One repair pass on every live node, concurrently."""
        live = [r for cid, r in self.repairers.items() if self.c.nodes[cid].alive]
        await asyncio.gather(*(r.run_once() for r in live))

    async def repair_until(
        self, done: Callable[[], Awaitable[bool]], timeout: float, what: str
    ) -> None:
        deadline = time.monotonic() + timeout
        while not await done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await self.pass_()
            await asyncio.sleep(0.05)

    async def restart(self, cid: str) -> None:
        """The killed node's process comes back: same store, a new data port, live again."""
        n = self.c.nodes[cid]
        n.server = DataServer(n.node, SECRET, cid)
        host, port = await n.server.start("127.0.0.1", 0)
        n.address = f"{host}:{port}"
        n.alive = True
        kv = await self.c.etcd.get(Keys.live_chunk(cid))
        assert kv is None
        zone = ChunkServerInfo.from_json((await self.c.etcd.get(Keys.chunk(cid))).value).zone  # type: ignore[union-attr]
        info = ChunkServerInfo(id=cid, portal="127.0.0.1:3260", data_address=n.address, zone=zone)
        status = ChunkServerStatus(
            id=cid,
            portal="127.0.0.1:3260",
            data_address=n.address,
            zone=zone,
            data_dirs=[{"path": "x", "capacity": 1 << 30, "free": 1 << 30}],
        )
        await self.c.etcd.put(Keys.chunk(cid), info.to_json())
        revision = await self.c.etcd.put(Keys.live_chunk(cid), status.to_json())
        for other in self.c.nodes.values():
            # the revision, not the key's presence: a view that has not seen the kill's
            # delete yet still holds the old record, and drops it after this returned
            await other.emap.live.wait_for_revision(revision, 10)

    async def replicas_identical(self, index: int, members: list[str]) -> bytes:
        """Every member's replica: same checksum array, same bytes; returns the bytes."""
        contents = set()
        arrays = set()
        for m in members:
            replica = await self.c.nodes[m].store.open(VID, index)
            arrays.add(await replica.checksums())
            data, _ = await replica.read_for_copy(0, EXTENT)
            contents.add(data)
        assert len(arrays) == 1 and len(contents) == 1, f"extent {index} replicas differ"
        return contents.pop()


@contextlib.asynccontextmanager
async def started_rig(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path, zones: tuple[str, ...]
) -> AsyncIterator[Rig]:
    """An in-process cluster of one chunk server per zone in `zones`, with its repairers."""
    config = EtcdConfig(endpoints=[etcd_server.endpoint], namespace=etcd_prefix, timeout=5)
    async with await Etcd.connect(config) as etcd:
        c = Cluster(etcd, tmp_path)
        for i, zone in enumerate(zones):
            await c.add(f"chunk-{i}", zone)
        await c.wait_known()
        r = Rig(c, replace_after=0.0)
        await r.start()
        try:
            yield r
        finally:
            await r.stop()
            await c.close()


@pytest.fixture
async def rig(etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path) -> AsyncIterator[Rig]:
    async with started_rig(etcd_server, etcd_prefix, tmp_path, ("z1", "z2", "z3", "z1")) as r:
        yield r


def version(block: int, v: int, n: int = 8) -> bytes:
    """`n` sectors of a recognisable pattern for (block, version)."""
    head = f"block {block} version {v}\n".encode()
    return (head * (n * SECTOR // len(head) + 1))[: n * SECTOR]


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_a_join_under_concurrent_writes_to_the_same_blocks_copies_once_and_loses_none(
    rig: Rig,
) -> None:
    c = rig.c
    v = await rig.volume("chunk-0", extents=1)
    for k in range(0, EXTENT // SECTOR, 64):  # every 32 KiB: the whole extent mapped in parts
        await v.write(k, version(k, 0, 16), fua=False)
    rec = rig.record(0)
    outsider = next(cid for cid in c.nodes if cid not in rec.replicas)
    primary = c.nodes[rec.primary]
    # Writers hammer the same blocks the copy moves: whole blocks and 512-byte pieces of them.
    expected: dict[int, bytes] = {}
    log: list[int] = []
    stop = asyncio.Event()

    async def writer(first: int, step: int) -> None:
        vol = c.volume(rec.replicas[1], size=EXTENT, vid=VID)
        v_ = 1
        while not stop.is_set():
            for k in range(first, EXTENT // SECTOR, step):
                n = 1 if (k + v_) % 3 == 0 else 8  # sub-block writes too
                data = version(k, v_, n)
                await vol.write(k, data, fua=False)
                expected[k] = data + expected.get(k, b"")[len(data) :]
                log.append(k)
            v_ += 1

    tasks = [asyncio.create_task(writer(0, 128)), asyncio.create_task(writer(40, 96))]
    await asyncio.sleep(0.2)
    writes_before = len(log)
    try:
        result = await join_member(primary.node, VID, 0, outsider, Throttle(64 << 10), run=64 << 10)
        overlapping = len(log) - writes_before
        await asyncio.sleep(0.2)  # writes continue with the new member
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert overlapping >= 5, "the writers were too slow to overlap the copy"
    # Every copy landed between the writes around it: one pass, nothing left to recopy.
    assert result.passes == 1, result
    assert result.bytes_copied >= EXTENT // 4  # the outsider started empty: all mapped blocks
    after = await rig.fresh(0)
    assert after.replicas == [*rec.replicas, outsider] and after.gen == rec.gen + 1
    data = await rig.replicas_identical(0, after.replicas)
    for k, want in expected.items():
        assert data[k * SECTOR : k * SECTOR + len(want)] == want, f"sector {k}"
    # the new member is current: it serves reads
    n = c.nodes[outsider]
    replica = await n.store.open(VID, 0)
    assert replica.state.name == "CURRENT" and replica.generation == after.gen


async def test_a_lost_member_is_replaced_and_the_operation_succeeds(rig: Rig) -> None:
    c = rig.c
    v = await rig.volume("chunk-0", extents=3)
    await v.write(0, b"".join(version(k, 1, 64) for k in range(0, 3 * EXTENT // SECTOR, 64)), False)
    records = {i: rig.record(i) for i in range(3)}
    # the primary of extent 0 dies, and no IO follows: the repair loops alone fail it over
    # (first live member), drop the dead member elsewhere, and copy new replicas
    victim = records[0].primary
    before = counter("lunastor_rebuild_extents_total")
    copied0 = counter("lunastor_rebuild_bytes_total")
    started = time.monotonic()
    await c.kill(victim)
    planner = RebuildPlanner(c.etcd)
    await planner.run_once()
    ops, _ = await c.etcd.get_prefix(Keys.OPERATIONS)
    (op,) = [OperationRecord.from_json(kv.value) for kv in ops]
    assert (op.kind, op.subject, op.state) == ("rebuild", victim, "running")
    assert op.total == sum(victim in r.replicas for r in records.values())

    async def restored() -> bool:
        recs = [await rig.fresh(i) for i in range(3)]
        return all(len(r.replicas) == 3 and victim not in r.replicas for r in recs)

    planned: set[ActionKind] = set()

    async def restored_noting_actions() -> bool:
        planned.update(a.kind for r in rig.repairers.values() for a in r.last)
        return await restored()

    await rig.repair_until(restored_noting_actions, 60, "every extent back to 3 replicas")
    elapsed = time.monotonic() - started
    assert {ActionKind.FAILOVER, ActionKind.ADD} <= planned, planned
    copied = counter("lunastor_rebuild_bytes_total") - copied0
    mib = copied / 2**20
    print(f"rebuilt {mib:.1f} MiB in {elapsed:.2f} s ({mib / elapsed:.1f} MiB/s)")
    assert counter("lunastor_rebuild_extents_total") - before == op.total
    for i in range(3):
        rec = await rig.fresh(i)
        data = await rig.replicas_identical(i, rec.replicas)
        assert data == b"".join(
            version(k, 1, 64) for k in range(i * EXTENT // SECTOR, (i + 1) * EXTENT // SECTOR, 64)
        )
    await planner.run_once()
    done = OperationRecord.from_json((await c.etcd.get(Keys.operation(op.id))).value)  # type: ignore[union-attr]
    assert (done.state, done.progress) == ("succeeded", 1.0)


async def test_a_returning_member_catches_up_with_only_the_changed_blocks(rig: Rig) -> None:
    c = rig.c
    rig.replace_after = 30.0  # a short outage is waited for, not replaced
    for r in rig.repairers.values():
        r.replace_after = 30.0
    v = await rig.volume("chunk-0", extents=2)
    await v.write(0, b"".join(version(k, 1, 64) for k in range(0, 2 * EXTENT // SECTOR, 64)), False)
    recs = {i: rig.record(i) for i in range(2)}
    away = next(m for m in recs[0].replicas[1:] if m != "chunk-0")
    await c.kill(away)
    # writes while it is away: the primaries drop it at the first forward that fails
    changed: set[tuple[int, int]] = set()
    for round_ in range(6):
        for i in range(2):
            for k in (3, 70, 71, 200):
                lba = (i * EXTENT + k * 4096) // SECTOR
                await v.write(lba, version(lba, round_ + 2, 8), fua=False)
                changed.add((i, k))
    for i in range(2):
        assert away not in (await rig.fresh(i)).replicas
    await rig.pass_()  # replace_after not reached: everybody waits for it
    waits = [a for r in rig.repairers.values() for a in r.last if a.kind is ActionKind.WAIT]
    assert waits
    for i in range(2):
        assert away not in (await rig.fresh(i)).replicas
    copied0 = counter("lunastor_rebuild_bytes_total")
    await rig.restart(away)

    async def rejoined() -> bool:
        return all(away in r.replicas for r in [await rig.fresh(i) for i in range(2)])

    await rig.repair_until(rejoined, 30, f"{away} to rejoin")
    copied = counter("lunastor_rebuild_bytes_total") - copied0
    changed_bytes = 4096 * sum(1 for i, _ in changed if away in recs[i].replicas)
    print(f"catch-up copied {copied:.0f} bytes; changed {changed_bytes}; extent size {EXTENT}")
    assert 0 < copied <= changed_bytes < EXTENT // 16  # only the changed blocks
    for i in range(2):
        rec = await rig.fresh(i)
        await rig.replicas_identical(i, rec.replicas)


async def test_a_drain_moves_every_replica_off_the_server(rig: Rig) -> None:
    c = rig.c
    v = await rig.volume("chunk-1", extents=4)
    await v.write(0, b"".join(version(k, 1, 64) for k in range(0, 4 * EXTENT // SECTOR, 64)), False)
    recs = {i: rig.record(i) for i in range(4)}
    # drain a server that is primary of one extent at least (it must hand over)
    victim = next(r.primary for r in recs.values())
    held = sum(victim in r.replicas for r in recs.values())
    op = OperationRecord(id="op-drain", kind="drain", subject=victim)
    admin = ChunkAdminRecord(id=victim, operation_id=op.id)
    await c.etcd.put(Keys.operation(op.id), op.to_json())
    await c.etcd.put(Keys.chunk_admin(victim), admin.to_json())
    for r in rig.repairers.values():
        await r.admin.wait_for(lambda cache: Keys.chunk_admin(victim) in cache.items, 10)
    planner = DrainPlanner(c.etcd)
    await planner.run_once()
    first = OperationRecord.from_json((await c.etcd.get(Keys.operation(op.id))).value)  # type: ignore[union-attr]
    assert first.state == "running" and first.total == held

    async def moved() -> bool:
        return all(victim not in r.replicas for r in [await rig.fresh(i) for i in range(4)])

    writes = 0

    async def writing() -> bool:
        nonlocal writes
        writes += 1
        await v.write(8 * writes, version(writes, 9, 8), fua=False)  # IO continues
        return await moved()

    await rig.repair_until(writing, 60, f"{victim} to be drained")
    await planner.run_once()
    done = OperationRecord.from_json((await c.etcd.get(Keys.operation(op.id))).value)  # type: ignore[union-attr]
    assert (done.state, done.progress) == ("succeeded", 1.0)
    admin_after = ChunkAdminRecord.from_json((await c.etcd.get(Keys.chunk_admin(victim))).value)  # type: ignore[union-attr]
    assert admin_after.state == "drained"
    for i in range(4):
        rec = await rig.fresh(i)
        assert len(rec.replicas) == 3
        await rig.replicas_identical(i, rec.replicas)
        with pytest.raises(ReplicaNotFound):
            await c.nodes[victim].store.open(VID, i)  # its files are gone
    assert await v.read(8, 8) == version(1, 9, 8)


async def test_a_primary_whose_replica_vanished_hands_the_extent_over(rig: Rig) -> None:
    # A wiped or replaced disk under a live primary: it must not serve zeros nor block the
    # extent forever; a secondary takes over, and a replica is copied back.
    c = rig.c
    v = await rig.volume("chunk-0", extents=1)
    data = b"".join(version(k, 1, 64) for k in range(0, EXTENT // SECTOR, 64))
    await v.write(0, data, fua=True)
    await v.write(0, version(0, 2, 8), fua=True)
    rec = await rig.fresh(0)
    owner = c.nodes[rec.primary]
    pe = await owner.node.lead(VID, 0)
    owner.node.forget(pe)  # as after a restart with an empty disk
    await (await owner.store.open(VID, 0)).delete()

    async def healed() -> bool:
        now = await rig.fresh(0)
        return now.primary != owner.id and not now.converging and len(now.replicas) == 3

    await rig.repair_until(healed, 60, "a secondary to take over and a replica to be re-added")
    now = await rig.fresh(0)
    want = version(0, 2, 8) + data[8 * SECTOR :]
    assert await rig.replicas_identical(0, now.replicas) == want
    assert await v.read(0, EXTENT // SECTOR) == want


async def test_an_extent_left_below_min_replicas_gets_members_back(rig: Rig) -> None:
    """Two of three members die: the survivor alone is below min_replicas, so it refuses
    writes, but joining a member must still work (the join is how it gets back above)."""
    c = rig.c
    v = await rig.volume("chunk-0", extents=1)
    data = b"".join(version(k, 1, 64) for k in range(0, EXTENT // SECTOR, 64))
    await v.write(0, data, False)
    rec = rig.record(0)
    dead = rec.replicas[1:]
    for cid in dead:
        await c.kill(cid)

    async def restored() -> bool:
        now = await rig.fresh(0)
        return len(now.replicas) >= 2 and not set(dead) & set(now.replicas)

    await rig.repair_until(restored, 60, "the lone survivor to get a member back")
    now = await rig.fresh(0)
    assert await rig.replicas_identical(0, now.replicas) == data
    await v.write(0, version(0, 2), False)  # writes are accepted again
    assert await v.read(0, 8) == version(0, 2)


async def test_a_zoned_volume_is_re_replicated_only_inside_its_zones(rig: Rig) -> None:
    """A 2-replica volume restricted to z1 (its CSI topology) lives on chunk-0 and chunk-3,
    z1's only servers. When one dies, no server of z2 or z3 may take its place: the extents
    wait with one member (no-candidate) until a z1 server is back, which then catches up."""
    c = rig.c
    v = await rig.volume("chunk-0", extents=2, replicas=2, zones=["z1"])
    data = b"".join(version(k, 1, 64) for k in range(0, 2 * EXTENT // SECTOR, 64))
    await v.write(0, data, False)
    assert all(set(rig.record(i).replicas) == {"chunk-0", "chunk-3"} for i in range(2))
    await c.kill("chunk-3")

    async def alone() -> bool:
        now = [await rig.fresh(i) for i in range(2)]
        waiting = {a.kind for a in rig.repairers["chunk-0"].last}
        return all(r.replicas == ["chunk-0"] for r in now) and ActionKind.NO_CANDIDATE in waiting

    await rig.repair_until(alone, 60, "the dead member dropped, and no candidate in z1")
    for _ in range(3):  # more passes change nothing: z2 and z3 never take a replica
        await rig.pass_()
    assert [(await rig.fresh(i)).replicas for i in range(2)] == [["chunk-0"], ["chunk-0"]]
    await rig.restart("chunk-3")

    async def back() -> bool:
        members = [sorted((await rig.fresh(i)).replicas) for i in range(2)]
        return members == [["chunk-0", "chunk-3"]] * 2

    await rig.repair_until(back, 60, "z1's server back as a member")
    got = b"".join([await rig.replicas_identical(i, ["chunk-0", "chunk-3"]) for i in range(2)])
    assert got == data


async def test_an_extent_allocated_before_the_volume_record_arrives_still_honours_its_zones(
    rig: Rig,
) -> None:
    """The first write of a new volume can reach a server before its watch delivers the
    volume's record (CI met it): placement must read the record rather than place the extent
    anywhere. The watch is stopped here so that the race is certain."""
    emap = rig.c.nodes["chunk-1"].emap
    await emap.volumes.stop()
    record = VolumeRecord(id=VID, name=VID, size_bytes=8 * EXTENT, replicas=2, zones=["z1"])
    await rig.c.etcd.put(Keys.volume(VID), record.to_json())
    assert emap.volume(VID) is None  # the watch has not delivered it
    for index in range(8):  # several extents: the ring alone would put some outside z1
        entry = await emap.allocate(VID, index, 2)
        assert sorted(entry.record.replicas) == ["chunk-0", "chunk-3"], entry.record
