"""A hand-over that stopped before its commit (docs/faults.md, "A whole-cluster restart after
failures"), with real parts in one process (real etcd, data nodes on real sockets, repair
passes: the rig of test_rebuild.py).

`locality.hand_over` (a clean stop's, a locality move's) makes every member adopt gen + 1,
then commits the new primary at gen + 1. A `docker compose restart` stops etcd together with
the chunk servers: a stopping server whose etcd went away between the two left its members
at gen + 1 under a map at gen. Every member then refused the map's reads and writes as of an
old generation, the primary refused to set the extent up ("our replica is newer than our
map"), and nothing ever changed it: the extent stayed NOT READY for good. The same with one
member left at gen + 1 (the hand-over failed at the next member): reads through it failed,
and the first write removed it.

Here the state is made as the hand-over leaves it (the members' replicas at gen + 1, no
commit), the servers are restarted, and the extent must serve again with every member kept
and nothing copied.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lunastor.chunk.access.volume import ReplicatedVolume
from lunastor.chunk.store import ReplicaState
from tests.integration.chunk.test_power_loss import states
from tests.integration.chunk.test_rebuild import VID, Rig, started_rig, version
from tests.support.etcd import EtcdServer


@pytest.fixture
async def rig(etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path) -> AsyncIterator[Rig]:
    async with started_rig(etcd_server, etcd_prefix, tmp_path, ("z1", "z2", "z3")) as r:
        for n in r.c.nodes.values():
            n.node.resume = n.path.recover  # as the data path wires it (service.py)
        yield r


async def stopped_before_commit(rig: Rig, members: list[str]) -> int:
    """What `hand_over` leaves when its commit never happens: `members` at gen + 1 (every
    forward settled before, so their contents are equal), the map still at gen. Then every
    server restarts (a new process: no primary state). Returns the map's gen."""
    rec = rig.record(0)
    for m in members:
        replica = await rig.c.nodes[m].store.open(VID, 0)
        await replica.set_generation(rec.gen + 1)
    for cid in rig.c.nodes:
        await rig.c.kill(cid)
        rig.c.nodes[cid].node._primaries.clear()
    for cid in rig.c.nodes:
        await rig.restart(cid)
    return rec.gen


async def gens(rig: Rig) -> dict[str, int]:
    out = {}
    for m in rig.record(0).replicas:
        out[m] = (await rig.c.nodes[m].store.open(VID, 0)).generation
    return out


async def test_every_member_ahead_of_the_map_is_read_again_after_a_repair_pass(rig: Rig) -> None:
    vol = await rig.volume("chunk-1", extents=1)
    await vol.write(0, version(0, 1), fua=True)
    await vol.write(64, version(1, 1), fua=False)
    before = rig.record(0)
    gen = await stopped_before_commit(rig, list(before.replicas))
    assert set((await gens(rig)).values()) == {gen + 1}

    async def resumed() -> bool:
        rec = rig.record(0)
        return not rec.converging and rec.gen > gen

    # no write comes (a reader only): the primary's repair pass converges it
    await rig.repair_until(resumed, 20, "the extent to converge past the hand-over's gen")
    after = rig.record(0)
    assert after.replicas == before.replicas, "members or primary changed"
    assert set((await gens(rig)).values()) == {after.gen}
    vol.path.io_timeout = 5.0
    assert await vol.read(0, 8) == version(0, 1)
    assert await vol.read(64, 8) == version(1, 1)
    await vol.write(128, version(2, 1), fua=True)
    await rig.replicas_identical(0, after.replicas)


async def test_every_member_ahead_of_the_map_converges_at_the_first_write(rig: Rig) -> None:
    """No repair pass: the first write after the restart converges the members itself."""
    vol = await rig.volume("chunk-1", extents=1)
    await vol.write(0, version(0, 1), fua=True)
    before = rig.record(0)
    await stopped_before_commit(rig, list(before.replicas))
    vol.path.io_timeout = 10.0
    await vol.write(64, version(1, 1), fua=True)  # NOT READY for good before the fix
    after = rig.record(0)
    assert after.replicas == before.replicas and not after.converging
    assert await vol.read(0, 8) == version(0, 1)
    assert set((await states(rig, 0)).values()) == {ReplicaState.CURRENT}
    await rig.replicas_identical(0, after.replicas)


async def test_one_member_ahead_of_the_map_serves_reads_and_is_kept_at_the_next_write(
    rig: Rig,
) -> None:
    """The hand-over pushed gen + 1 to one secondary and failed at the next member."""
    vol0 = await rig.volume("chunk-0", extents=1)
    await vol0.write(0, version(0, 1), fua=True)
    before = rig.record(0)
    ahead = before.replicas[1]
    gen = await stopped_before_commit(rig, [ahead])
    assert (await gens(rig))[ahead] == gen + 1
    via = rig.c.nodes[ahead].path  # the access point whose own replica is ahead
    via.io_timeout = 5.0
    vol = ReplicatedVolume(vol0.record, via, vol0.extent_size)
    assert await vol.read(0, 8) == version(0, 1)  # NOT READY before the fix
    via.io_timeout = 10.0
    await vol.write(64, version(1, 1), fua=True)
    after = rig.record(0)
    assert after.replicas == before.replicas, "the member ahead was removed"
    assert not after.converging and after.gen > gen
    assert await vol.read(64, 8) == version(1, 1)
    await rig.replicas_identical(0, after.replicas)


async def test_members_behind_the_map_serve_reads_and_are_kept_at_the_next_write(
    rig: Rig,
) -> None:
    """The other way round: a change committed gen + 1 and its push to the members was cut
    short (a join's `_commit` stopped after the primary adopted it): the primary at gen + 1,
    the others at gen. Reads through a member failed, and the next write removed them."""
    vol0 = await rig.volume("chunk-0", extents=1)
    await vol0.write(0, version(0, 1), fua=True)
    before = rig.record(0)
    primary = rig.c.nodes[before.primary]
    entry = await primary.emap.fresh(VID, 0)
    assert entry is not None
    committed = await primary.emap.replace(entry, dataclasses.replace(before, gen=before.gen + 1))
    assert committed is not None
    await (await primary.store.open(VID, 0)).set_generation(before.gen + 1)
    for cid in rig.c.nodes:
        await rig.c.kill(cid)
        rig.c.nodes[cid].node._primaries.clear()
    for cid in rig.c.nodes:
        await rig.restart(cid)
    behind = before.replicas[1]
    assert (await gens(rig))[behind] == before.gen
    via = rig.c.nodes[behind].path
    via.io_timeout = 5.0
    vol = ReplicatedVolume(vol0.record, via, vol0.extent_size)
    assert await vol.read(0, 8) == version(0, 1)  # NOT READY before the fix
    via.io_timeout = 10.0
    await vol.write(64, version(1, 1), fua=True)
    after = rig.record(0)
    assert after.replicas == before.replicas, "a member behind the map was removed"
    assert set((await gens(rig)).values()) == {after.gen}
    await rig.replicas_identical(0, after.replicas)


async def test_the_convergence_waits_for_an_expected_member_and_keeps_the_primary(
    rig: Rig,
) -> None:
    """Seen after a compose restart: the primary's convergence past the uncommitted gen + 1
    waited for a member still starting (expected back), then went on as a failover that
    left the primary itself out (it re-joined by a copy)."""
    vol = await rig.volume("chunk-1", extents=1)
    await vol.write(0, version(0, 1), fua=True)
    before = rig.record(0)
    gen = await stopped_before_commit(rig, list(before.replicas))
    late = before.replicas[2]
    await rig.c.kill(late)  # still starting: back within a second, expected until then
    primary = rig.c.nodes[before.primary]
    until = time.monotonic() + 3.0
    primary.path.expected_back = lambda m: until if m == late else 0.0

    async def back() -> None:
        await asyncio.sleep(1.0)
        await rig.restart(late)

    comeback = asyncio.ensure_future(back())
    await rig.repairers[before.primary].run_once()  # converges after waiting for `late`
    await comeback

    async def resumed() -> bool:
        rec = await rig.fresh(0)
        return not rec.converging and rec.gen > gen

    await rig.repair_until(resumed, 20, "the extent to converge")
    assert (await rig.fresh(0)).replicas == before.replicas, "a member (the primary?) was left out"


async def test_the_convergence_waits_for_a_live_member_that_does_not_answer_yet(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A member whose live record is still there (from before a whole-cluster restart) and
    whose process is not up yet: the convergence waits for it instead of leaving it out."""
    vol = await rig.volume("chunk-1", extents=1)
    await vol.write(0, version(0, 1), fua=True)
    before = rig.record(0)
    gen = await stopped_before_commit(rig, list(before.replicas))
    late = before.replicas[2]
    n = rig.c.nodes[late]
    await n.server.close()  # its port closed, its live record kept
    waiting = f"waiting for ['{late}'] to answer before converging"
    await rig.repairers[before.primary].run_once()  # the primary's set-up starts the recovery

    deadline = time.monotonic() + 20
    while waiting not in caplog.text:  # (in the background: the record must stay until then)
        assert time.monotonic() < deadline, "the recovery never waited for the live member"
        await asyncio.sleep(0.05)
    assert (await rig.fresh(0)).replicas == before.replicas, "a live member was left out"
    await rig.c.kill(late)
    await rig.restart(late)

    async def resumed() -> bool:
        rec = await rig.fresh(0)
        return not rec.converging and rec.gen > gen

    await rig.repair_until(resumed, 20, "the extent to converge")
    assert (await rig.fresh(0)).replicas == before.replicas
    vol.path.io_timeout = 5.0
    assert await vol.read(0, 8) == version(0, 1)
