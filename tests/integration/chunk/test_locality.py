"""Locality with real data nodes, a real etcd and the repair loop (docs/datapath.md,
"Locality"): an access point that keeps writing an extent claims it; the primary hands over
to it (a member) or first makes it a member (join, then retire another); its writes are then
sequenced in its own process. Nothing acknowledged is lost, the replicas stay identical, and
two access points writing one extent move its primary less and less often."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from lunastor.chunk.access.volume import ReplicatedVolume
from lunastor.chunk.maintenance.locality_plan import ClaimPolicy
from lunastor.chunk.maintenance.repair import Repairer
from lunastor.common.records import ExtentRecord, Keys, LocalityClaim, VolumeRecord
from tests.integration.chunk import test_replication
from tests.integration.chunk.test_replication import EXTENT, Cluster
from tests.support.clock import Clock

cluster = test_replication.cluster  # the same real cluster fixture: three data nodes, etcd

VID = "vol-l"
SECTORS = EXTENT // 512


class Rig:
    def __init__(self, c: Cluster, policy: ClaimPolicy) -> None:
        self.c = c
        self.policy = policy
        self.clock = Clock()
        self.repairers: dict[str, Repairer] = {}

    async def start(self, replicas: int) -> None:
        record = VolumeRecord(id=VID, name=VID, size_bytes=2 * EXTENT, replicas=replicas)
        await self.c.etcd.put(Keys.volume(VID), record.to_json())
        self.record = record
        for cid, n in self.c.nodes.items():
            r = await Repairer(
                self.c.etcd,
                n.emap,
                n.node,
                n.path,
                replace_after=60,
                rebuild_rate=256 << 20,
                concurrency=2,
                interval=1,
                locality=self.policy,
            ).start(loop_forever=False)
            assert r.claimer is not None
            r.claimer.clock = self.clock
            await r.volumes.wait_for(lambda c: Keys.volume(VID) in c.items, 10)
            self.repairers[cid] = r

    async def stop(self) -> None:
        for r in self.repairers.values():
            await r.stop()

    def volume(self, via: str) -> ReplicatedVolume:
        return ReplicatedVolume(self.record, self.c.nodes[via].path, EXTENT)

    def rec(self, index: int = 0) -> ExtentRecord:
        found = self.c.nodes["chunk-0"].emap.get(VID, index)
        assert found is not None
        return found

    async def pass_(self) -> None:
        await asyncio.gather(*(r.run_once() for r in self.repairers.values()))
        # every node's caches see the claims and the map the pass wrote
        extents = await self.newest(Keys.EXTENTS)
        claims = await self.newest(Keys.LOCALITY)
        for n in self.c.nodes.values():
            await n.emap.extents.wait_for_revision(extents, 5)
        for r in self.repairers.values():
            await r.claims.wait_for_revision(claims, 5)

    async def newest(self, prefix: str) -> int:
        kvs, _ = await self.c.etcd.get_prefix(prefix)
        return max((kv.mod_revision for kv in kvs), default=0)


@pytest.fixture
async def rig(cluster: Cluster) -> AsyncIterator[Rig]:
    r = Rig(cluster, ClaimPolicy(min_iops=2, hold=4.0, max_hold=64.0))
    try:
        yield r
    finally:
        await r.stop()


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def write_blocks(v: ReplicatedVolume, n: int, base: int, data: dict[int, bytes]) -> None:
    for i in range(n):
        lba = base + (i % 64) * 8
        block = os.urandom(4096)
        await v.write(lba, block, fua=False)
        data[lba] = block


async def check(rig: Rig, data: dict[int, bytes]) -> None:
    for cid in rig.c.nodes:
        v = rig.volume(cid)
        for lba, block in data.items():
            assert bytes(await v.read(lba, 8)) == block, (cid, lba)
    rec = rig.rec()
    sums = set()
    for m in rec.replicas:
        replica = await rig.c.nodes[m].store.open(VID, 0)
        assert replica.generation == rec.gen
        sums.add(await replica.checksums())
    assert len(sums) == 1, "members differ"


async def until(rig: Rig, done: object, what: str, passes: int = 40) -> None:
    for _ in range(passes):
        if callable(done) and done():
            return
        await rig.pass_()
    raise AssertionError(f"not done after {passes} passes: {what}")


async def test_the_primary_follows_a_member_access_point(rig: Rig) -> None:
    await rig.start(replicas=3)
    data: dict[int, bytes] = {}
    await write_blocks(rig.volume("chunk-0"), 1, 0, data)
    first = rig.rec()
    ap = first.replicas[1]  # a secondary keeps writing through its own access point
    v = rig.volume(ap)
    await write_blocks(v, 32, 0, data)
    handovers = metric("lunastor_locality_handovers_total")

    def moved() -> bool:
        return rig.rec().primary == ap

    await until(rig, moved, "the primary to move to the access point")
    after = rig.rec()
    assert after.gen == first.gen + 1 and sorted(after.replicas) == sorted(first.replicas)
    assert metric("lunastor_locality_handovers_total") == handovers + 1
    kv = await rig.c.etcd.get(Keys.locality_claim(VID, 0))
    assert kv is not None and LocalityClaim.from_json(kv.value).chunk == ap
    # from now on its writes are sequenced in its own process
    seq, local = (
        metric("lunastor_writes_sequenced_total"),
        metric("lunastor_writes_sequenced_local_total"),
    )
    await write_blocks(v, 40, 0, data)
    assert metric("lunastor_writes_sequenced_total") - seq == 40
    assert metric("lunastor_writes_sequenced_local_total") - local == 40
    await check(rig, data)
    # settled: more passes change nothing
    for _ in range(3):
        await write_blocks(v, 10, 0, data)
        await rig.pass_()
    assert rig.rec().gen == after.gen


async def test_a_non_member_access_point_joins_then_the_old_copy_retires(rig: Rig) -> None:
    await rig.start(replicas=1)
    data: dict[int, bytes] = {}
    await write_blocks(rig.volume("chunk-0"), 4, 0, data)
    first = rig.rec()
    assert len(first.replicas) == 1
    ap = next(c for c in rig.c.nodes if c != first.primary)
    v = rig.volume(ap)
    await write_blocks(v, 16, 0, data)

    def moved() -> bool:
        return rig.rec().replicas == [ap]

    started = time.monotonic()
    while not moved():
        assert time.monotonic() - started < 60, "the access point never became the sole member"
        await write_blocks(v, 2, 0, data)  # writes go on meanwhile
        await rig.pass_()
    assert rig.rec().gen > first.gen
    local = metric("lunastor_writes_sequenced_local_total")
    await write_blocks(v, 10, 0, data)
    assert metric("lunastor_writes_sequenced_local_total") - local == 10
    await check(rig, data)
    # the old primary's copy is gone (retired, not left behind)
    with pytest.raises(Exception, match=r"not found|no replica"):
        await rig.c.nodes[first.primary].store.open(VID, 0)


async def test_two_access_points_on_one_extent_do_not_ping_pong(rig: Rig) -> None:
    await rig.start(replicas=3)
    data: dict[int, bytes] = {}
    await write_blocks(rig.volume("chunk-0"), 1, 0, data)
    a, b = rig.rec().replicas[1:3]
    va, vb = rig.volume(a), rig.volume(b)
    primaries = [rig.rec().primary]
    for _ in range(40):  # 2 s of claim-window each: 80 s with a 4 s base hold
        await asyncio.gather(write_blocks(va, 10, 0, data), write_blocks(vb, 10, 512, data))
        rig.clock.now += 2.0
        await rig.pass_()
        primaries.append(rig.rec().primary)
    moves = sum(1 for x, y in itertools.pairwise(primaries) if x != y)
    # the first claim moves it; then every takeover doubles the hold: 4, 8, 16, 32 s...
    assert 1 <= moves <= 6, primaries
    claim = LocalityClaim.from_json((await rig.c.etcd.get(Keys.locality_claim(VID, 0))).value)  # type: ignore[union-attr]
    assert claim.contests >= 1 and claim.hold > rig.policy.hold
    await check(rig, data)


async def read_blocks(v: ReplicatedVolume, n: int, data: dict[int, bytes]) -> None:
    lbas = list(data)
    for i in range(n):
        lba = lbas[i % len(lbas)]
        assert bytes(await v.read(lba, 8)) == data[lba], lba


async def test_reads_claim_an_extent_only_where_they_need_another_server(rig: Rig) -> None:
    # a member that reads its own replica (a second multipath path that only reads) leaves
    # the primary where the writes are; a non-member's reads (each one a hop) claim it
    await rig.start(replicas=3)
    data: dict[int, bytes] = {}
    await write_blocks(rig.volume("chunk-0"), 8, 0, data)
    first = rig.rec()
    member = rig.c.nodes[first.replicas[1]]
    reader = rig.volume(first.replicas[1])
    started = time.monotonic()  # its first read lease comes with the primary's next ping
    while not member.node.may_serve_read(VID, 0):
        assert time.monotonic() - started < 10, "the member never got a read lease"
        await asyncio.sleep(0.05)
    local = metric("lunastor_local_reads_total")
    for _ in range(4):
        await read_blocks(reader, 40, data)
        rig.clock.now += 2.0
        await rig.pass_()
    # (its first read opens the replica on the general path: it too is the member's own)
    assert metric("lunastor_local_reads_total") - local >= 150, "the member did not read locally"
    assert rig.rec().primary == first.primary and rig.rec().gen == first.gen
    assert await rig.c.etcd.get(Keys.locality_claim(VID, 0)) is None


async def test_a_non_member_that_only_reads_claims_the_extent(rig: Rig) -> None:
    await rig.start(replicas=1)
    data: dict[int, bytes] = {}
    await write_blocks(rig.volume("chunk-0"), 8, 0, data)
    first = rig.rec()
    ap = next(c for c in rig.c.nodes if c != first.primary)
    reader = rig.volume(ap)

    def moved() -> bool:
        return rig.rec().replicas == [ap]

    started = time.monotonic()
    while not moved():
        assert time.monotonic() - started < 60, "the reading access point never became the member"
        await read_blocks(reader, 40, data)
        await rig.pass_()
    await check(rig, data)
