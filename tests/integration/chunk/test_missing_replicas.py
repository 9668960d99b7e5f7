"""A chunk server starting looks for replicas the extent map says it holds but no data
directory has (`DataDirMonitor.find_missing_replicas`, a wiped disk), with the in-process
cluster of test_replication.py: a new extent's replica that has not arrived yet is not one."""

from __future__ import annotations

import asyncio

from lunastor.chunk.access.volume import ReplicatedVolume
from lunastor.chunk.maintenance.datadirs import DataDirMonitor
from lunastor.chunk.maintenance.locality import hand_over
from lunastor.chunk.replication.join import Throttle, join_member
from lunastor.common.records import ExtentRecord
from tests.integration.chunk.test_replication import Cluster, Node, blocks
from tests.integration.chunk.test_replication import cluster as cluster
from tests.support.procs import async_wait_for


async def written(cluster: Cluster) -> tuple[ReplicatedVolume, ExtentRecord]:
    """vol-t with blocks(1, 8) written at 0 through chunk-0 (durable), and its extent's record."""
    v = cluster.volume("chunk-0")
    await v.write(0, blocks(1, 8), fua=True)
    rec = cluster.nodes["chunk-0"].emap.get("vol-t", 0)
    assert rec is not None
    return v, rec


def monitor_of(node: Node) -> DataDirMonitor:
    """The start-up check of `node`'s data directories (run by the tests, not on a timer)."""
    return DataDirMonitor(node.store, node.node, node.path, node.emap, node.id, interval=60)


async def test_a_new_extents_secondary_is_not_missing_before_its_first_write(
    cluster: Cluster,
) -> None:
    # Issue 14: a chunk server starting while an extent was allocated found the primary's
    # replica (created first) but not its own (the primary's Create to it came next), took
    # it for a wiped disk and left: the primary removed a healthy member, and the SIGKILL of
    # a second member then left the extent below min_replicas for `replace_after` (60 s).
    rec = (await cluster.nodes["chunk-0"].emap.allocate("vol-t", 0, 3)).record
    primary, secondary = cluster.nodes[rec.primary], cluster.nodes[rec.replicas[1]]
    # the primary between creating its own replica and its secondaries' (`_become_primary`)
    await primary.store.create("vol-t", 0, rec.gen)
    monitor = monitor_of(secondary)
    assert await monitor.find_missing_replicas() == []
    v = cluster.volume(primary.id)
    await v.write(0, blocks(1, 8), fua=True)
    after = primary.emap.get("vol-t", 0)
    assert after is not None and after.replicas == rec.replicas and after.gen == rec.gen
    # once a write was applied, a replica that is gone is missing (the wiped disk)
    replica = await secondary.store.open("vol-t", 0)
    await replica.delete()
    assert await monitor.find_missing_replicas() == [("vol-t", 0)]
    assert await v.read(0, 8) == blocks(1, 8)


async def test_a_missing_copy_that_holds_data_but_no_write_of_its_own_is_missing(
    cluster: Cluster,
) -> None:
    # A snapshot's preserved copy (store.clone) holds data with applied_seq 0: a wiped
    # secondary's copy of it must still count as missing, or the snapshot silently keeps a
    # member without the data (the final bench's re-replication waited for it forever).
    _, rec = await written(cluster)
    copy = (await cluster.nodes[rec.primary].emap.allocate("vol-p", 0, 3, on=rec.replicas)).record
    primary, secondary = cluster.nodes[copy.primary], cluster.nodes[copy.replicas[1]]
    made = await primary.store.clone("vol-t", 0, "vol-p", copy.gen)
    assert made is not None and made.applied_seq == 0
    monitor = monitor_of(secondary)

    async def seen() -> bool:  # the secondary's map names it (its watch may lag under load)
        return secondary.emap.get("vol-p", 0) is not None

    await async_wait_for(seen, 10, "the secondary to see the copy's extent")
    assert await monitor.find_missing_replicas() == [("vol-p", 0)]


async def test_a_refused_leave_is_tried_again_soon_not_at_the_next_probe(
    cluster: Cluster,
) -> None:
    # Issue 12: a server back with a wiped disk asked the primaries to drop it while it was
    # still starting (expected back: they refuse, "restarting: writes wait for it") and tried
    # again only at its next data-directory probe, 5 s later by default, while the rebuild
    # of every replica it held waited. The probe interval is long here: waiting for it shows.
    v, rec = await written(cluster)
    primary, secondary = cluster.nodes[rec.primary], cluster.nodes[rec.replicas[1]]
    await (await secondary.store.open("vol-t", 0)).delete()  # the wiped disk
    loop = asyncio.get_running_loop()
    ready_at = loop.time() + 0.3  # the secondary serves from then on
    primary.node.expected_back = lambda member: member == secondary.id and loop.time() < ready_at
    monitor = DataDirMonitor(
        secondary.store, secondary.node, secondary.path, secondary.emap, secondary.id, interval=60
    )

    async def dropped() -> bool:
        now = primary.emap.get("vol-t", 0)
        return now is not None and secondary.id not in now.replicas

    monitor.start()
    try:
        await async_wait_for(dropped, 10, "the primary to drop the wiped secondary")
    finally:
        await monitor.stop()
    assert await v.read(0, 8) == blocks(1, 8)


async def test_a_lost_replica_copied_back_by_a_join_is_not_lost_any_more(
    cluster: Cluster,
) -> None:
    # Issue 12 (CI): a secondary whose replica was lost left the replica set and was added
    # back by a join before its next data-directory pass. It still took the extent for lost
    # and refused the next primary's Create ("lost with its data directory"): the copy it
    # had just received was removed again, and the extent stayed one member short.
    _, rec = await written(cluster)
    primary, secondary, third = (cluster.nodes[m] for m in rec.replicas)
    await (await secondary.store.open("vol-t", 0)).delete()  # the wiped disk
    monitor = monitor_of(secondary)
    assert await monitor.find_missing_replicas() == [("vol-t", 0)]  # and it left

    async def dropped() -> bool:
        now = await primary.emap.fresh("vol-t", 0)
        return now is not None and secondary.id not in now.record.replicas

    await async_wait_for(dropped, 10, "the primary to drop the wiped secondary")
    await join_member(primary.node, "vol-t", 0, secondary.id, Throttle(64 << 10))
    gen = await hand_over(primary.node, "vol-t", 0, third.id)

    async def handed() -> bool:
        now = third.emap.get("vol-t", 0)
        return now is not None and now.gen == gen

    await async_wait_for(handed, 10, "the new primary's map")
    # the new primary sets the extent up: its Create to the secondary must find the copy
    await cluster.volume(third.id).write(8, blocks(2, 8), fua=True)
    now = await third.emap.fresh("vol-t", 0)
    assert now is not None and secondary.id in now.record.replicas, now
    replica = await secondary.store.open("vol-t", 0)
    assert await replica.read(0, 16 * 512) == blocks(1, 8) + blocks(2, 8)
