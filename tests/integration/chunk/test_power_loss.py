"""Replicas that lost their page cache (a host's power loss) come back without an operator
(docs/faults.md, "Planned restarts" and "A whole cluster comes back"), with real parts in one
process (real etcd, data nodes on real sockets, each node's repair loop run a pass at a time:
the rig of test_rebuild.py). A power loss is simulated as the store sees it: the replicas are
abandoned without a clean close and reopened under another boot id, so each comes back STALE
with its applied_seq cut back to what was flushed.

* every member lost its page cache (a whole-cluster power loss): no member is current; the
  most advanced one resumes, the others converge from it, every member stays, and every
  write acknowledged as durable (FUA) reads back;
* only the primary's host lost it: a current secondary takes over and the old primary is
  converged back, not removed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lunastor.chunk.store import ExtentStore, ReplicaState
from lunastor.iscsi.blockdev import NotReady
from tests.integration.chunk.test_rebuild import VID, Rig, started_rig, version
from tests.integration.chunk.test_replication import EXTENT
from tests.support.etcd import EtcdServer

SECTOR = 512
PER_EXTENT = EXTENT // SECTOR


@pytest.fixture
async def rig(etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path) -> AsyncIterator[Rig]:
    async with started_rig(etcd_server, etcd_prefix, tmp_path, ("z1", "z2", "z3")) as r:
        yield r


async def power_loss(rig: Rig, victims: list[str]) -> None:
    """`victims` lose power and come back: their replicas abandoned as they were (DIRTY),
    their stores reopened under a new boot id."""
    boot = os.urandom(16)
    for cid in victims:
        await rig.c.kill(cid)
    for cid in victims:
        n = rig.c.nodes[cid]
        for replica in n.store.open_replicas():
            replica.abandon()
        store = ExtentStore(n.store.data_dirs, EXTENT, boot_id=boot)
        n.store = n.node.store = store
        n.node._primaries.clear()  # a new process: no primary state
    for cid in victims:
        await rig.restart(cid)


async def states(rig: Rig, index: int) -> dict[str, ReplicaState]:
    rec = rig.record(index)
    out = {}
    for m in rec.replicas:
        replica = await rig.c.nodes[m].store.open(VID, index)
        out[m] = replica.state
    return out


async def test_a_whole_cluster_power_loss_resumes_the_most_advanced_member(rig: Rig) -> None:
    vol = await rig.volume("chunk-0", extents=1)
    await vol.write(0, version(0, 1), fua=True)
    await vol.write(64, version(1, 1), fua=True)
    await vol.write(64, version(1, 2), fua=False)  # not durable: may be lost
    await vol.write(128, version(2, 1), fua=False)
    before = rig.record(0)
    await power_loss(rig, list(rig.c.nodes))
    assert set((await states(rig, 0)).values()) == {ReplicaState.STALE}
    with pytest.raises(NotReady):  # nobody is current: no write can be ordered
        vol.path.io_timeout = 1.0
        await vol.write(192, version(3, 1), fua=True)
    vol.path.io_timeout = 10.0

    async def resumed() -> bool:
        rec = rig.record(0)
        return not rec.converging and rec.gen > before.gen

    await rig.repair_until(resumed, 20, "the extent to resume")
    after = rig.record(0)
    assert sorted(after.replicas) == sorted(before.replicas), "a member was left out"
    assert set((await states(rig, 0)).values()) == {ReplicaState.CURRENT}
    await vol.write(192, version(3, 1), fua=True)
    assert await vol.read(0, 8) == version(0, 1)  # durable: must be there
    assert await vol.read(64, 8) in (version(1, 1), version(1, 2))
    assert await vol.read(192, 8) == version(3, 1)
    await rig.replicas_identical(0, after.replicas)


async def test_a_primary_that_lost_its_page_cache_hands_over_and_is_converged_back(
    rig: Rig,
) -> None:
    vol = await rig.volume("chunk-0", extents=1)
    await vol.write(0, version(0, 1), fua=True)
    await vol.write(64, version(1, 1), fua=False)
    before = rig.record(0)
    primary = before.primary
    await power_loss(rig, [primary])
    assert (await states(rig, 0))[primary] is ReplicaState.STALE

    async def resumed() -> bool:
        rec = rig.record(0)
        return not rec.converging and rec.primary != primary

    await rig.repair_until(resumed, 20, "a current member to take the extent over")
    after = rig.record(0)
    assert sorted(after.replicas) == sorted(before.replicas), "the old primary was removed"
    assert set((await states(rig, 0)).values()) == {ReplicaState.CURRENT}
    # acknowledged, not durable, but on the current members: never lost
    assert await vol.read(64, 8) == version(1, 1)
    assert await vol.read(0, 8) == version(0, 1)
    await vol.write(128, version(2, 1), fua=False)
    await rig.replicas_identical(0, after.replicas)


async def test_a_stale_primary_converges_at_the_first_write_without_a_repair_pass(
    rig: Rig,
) -> None:
    """As the data path wires it (service.py: `DataNode.resume`): the first write after the
    power loss starts the convergence itself; no repair pass runs in this test."""
    for n in rig.c.nodes.values():
        n.node.resume = n.path.recover
    vol = await rig.volume("chunk-0", extents=1)
    await vol.write(0, version(0, 1), fua=True)
    before = rig.record(0)
    await power_loss(rig, list(rig.c.nodes))
    for n in rig.c.nodes.values():
        n.node.resume = n.path.recover
    await vol.write(64, version(1, 1), fua=True)  # waits for the convergence, then goes on
    after = rig.record(0)
    assert after.gen > before.gen and not after.converging
    assert sorted(after.replicas) == sorted(before.replicas)
    assert await vol.read(0, 8) == version(0, 1)
    await rig.replicas_identical(0, after.replicas)
