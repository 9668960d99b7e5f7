"""Stale in-flight writes after a path switch are fenced by nexus epochs (issue #6;
docs/datapath.md, "Fencing stale writes").

Real parts in one process: a real etcd, three data nodes on real sockets, an access path per
node (tests/integration/chunk/test_replication.py's cluster), and a TCP proxy on the old access
point's link to the primary that holds the old write until the new one is acknowledged.

Why the access points' `ReplicatedVolume` API and not an iSCSI initiator drives the race: the
race needs the old write to be *in flight on the chunk link* while the initiator re-logs in
elsewhere and rewrites; with a real initiator the moment its write leaves the old access point
cannot be chosen, and its recovery timeouts (libiscsi reconnects, open-iscsi's
replacement_timeout) are seconds of nondeterminism. Here the login is what the iSCSI server's
`NexusObserver` hook does at every login (`NexusEpochs.nexus_started`), and the writes carry the
`Nexus` exactly as the SCSI layer passes it; the hook itself is tested with a real libiscsi
login in test_fencing_login.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from lunastor.chunk.replication.fencing import EpochTable
from lunastor.chunk.wire.messages import Ping
from lunastor.chunk.wire.peer import PeerClient
from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.records import Keys
from lunastor.iscsi.blockdev import NexusLost
from lunastor.iscsi.scsi.types import Nexus
from tests.integration.chunk.test_replication import SECRET, Cluster, Node, blocks
from tests.integration.tcp_proxy import TcpProxy
from tests.support.etcd import EtcdServer
from tests.support.procs import async_wait_for

HOST = "iqn.2026-11.org.example:failover-host"
TARGET = "iqn.2026-11.io.lunastor:tgt-1"
NEXUS = Nexus(HOST, 0x23D000001, TARGET)
OTHER_PATH = Nexus(HOST, 0x23D000002, TARGET)  # the same initiator's second multipath session
VOL = "vol-t"


async def make_cluster(etcd: Etcd, root: Path, fence: bool) -> Cluster:
    c = Cluster(etcd, root)
    for i, zone in enumerate(("z1", "z2", "z3")):
        await c.add(f"chunk-{i}", zone, fence=fence)
    await c.wait_known()
    return c


@pytest.fixture
async def etcd(etcd_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[Etcd]:
    config = EtcdConfig(endpoints=[etcd_server.endpoint], namespace=etcd_prefix, timeout=5)
    async with await Etcd.connect(config) as client:
        yield client


def login(node: Node, nexus: Nexus) -> Callable[[], None]:
    """What the iSCSI server does when a session of `nexus` logs in at `node`."""
    if node.epochs is None:  # fencing off: no epochs are stored
        return lambda: None
    return node.epochs.nexus_started(nexus)


@dataclass
class Race:
    primary: Node
    old: Node  # the access point with the slow link to the primary
    new: Node  # the access point the initiator fails over to
    proxy: TcpProxy
    stale: asyncio.Future[None]  # the old write, held in the proxy


STALE, FRESH = blocks(1, 8), blocks(2, 8)  # 4 KiB at LBA 0 (one block of extent 0)


async def start_race(c: Cluster) -> Race:
    """Through the old access point: a login and an acknowledged write, then a second write
    that the slow link holds. Returns with the stale write in flight."""
    setup = c.volume("chunk-0")
    await setup.write(0, blocks(0, 8), fua=False)  # allocates extent 0: now it has a primary
    rec = c.nodes["chunk-0"].emap.get(VOL, 0)
    assert rec is not None
    primary = c.nodes[rec.primary]
    old, new = (n for n in c.nodes.values() if n is not primary)
    proxy = await TcpProxy(primary.address).start()
    # the old access point reaches the primary only through the proxy
    client = PeerClient("127.0.0.1", proxy.port, SECRET, old.id, request_timeout=60)
    old.replicas._clients[(primary.id, 0)] = (primary.address, client)
    assert (await old.replicas.call(primary.id, Ping)).ok
    login(old, NEXUS)
    v_old = c.volume(old.id)
    await v_old.write(0, blocks(3, 8), fua=False, nexus=NEXUS)  # acknowledged normally
    proxy.hold()  # the link slows down
    stale = asyncio.ensure_future(v_old.write(0, STALE, fua=False, nexus=NEXUS))
    await async_wait_for(_held(proxy), 10, "the stale write held in the proxy")
    return Race(primary, old, new, proxy, stale)


def _held(proxy: TcpProxy) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return proxy.held > 0

    return check


async def fail_over(c: Cluster, race: Race) -> None:
    """The initiator timed out on the old access point, logs in through the new one with the
    same I_T nexus (same ISID) and rewrites the block: acknowledged."""
    login(race.new, NEXUS)
    await c.volume(race.new.id).write(0, FRESH, fua=True, nexus=NEXUS)


async def replica_contents(c: Cluster) -> dict[str, bytes]:
    out = {}
    for n in c.nodes.values():
        replica = await n.store.open(VOL, 0)
        out[n.id] = await replica.read(0, len(FRESH))
    return out


async def test_a_stale_write_from_the_old_access_point_is_refused(
    etcd: Etcd, tmp_path: Path
) -> None:
    c = await make_cluster(etcd, tmp_path, fence=True)
    try:
        race = await start_race(c)
        await fail_over(c, race)
        before = REGISTRY.get_sample_value("lunastor_writes_fenced_total") or 0.0
        race.proxy.release()  # the old write reaches the primary now, after the new one
        with pytest.raises(NexusLost):
            await race.stale
        assert REGISTRY.get_sample_value("lunastor_writes_fenced_total") == before + 1
        contents = await replica_contents(c)
        assert contents == {n: FRESH for n in c.nodes}, "the newer data must survive everywhere"
        # the other path of a multipath initiator (another ISID) logged in at the old access
        # point before the failover is not fenced by it
        v_old = c.volume(race.old.id)
        await v_old.write(8, blocks(4, 8), fua=False, nexus=OTHER_PATH)
        assert await v_old.read(8, 8) == blocks(4, 8)
        await race.proxy.stop()
    finally:
        await c.close()


async def test_without_fencing_the_stale_write_overwrites_the_newer_data(
    etcd: Etcd, tmp_path: Path
) -> None:
    # The negative control: the same race with fence_writes off loses the acknowledged write,
    # so the test above would fail without fencing.
    c = await make_cluster(etcd, tmp_path, fence=False)
    try:
        race = await start_race(c)
        await fail_over(c, race)
        race.proxy.release()
        await race.stale  # applied and acknowledged to a session that no longer exists
        contents = await replica_contents(c)
        assert contents == {n: STALE for n in c.nodes}, "the acknowledged FRESH write is lost"
        await race.proxy.stop()
    finally:
        await c.close()


async def test_a_primary_that_forgot_what_it_saw_learns_the_newest_login_from_etcd(
    etcd: Etcd, tmp_path: Path
) -> None:
    # A primary that restarted (its seen epochs are gone) while the stale write was in flight:
    # the newer login is still stored in etcd (its session is alive), so it refuses anyway.
    c = await make_cluster(etcd, tmp_path, fence=True)
    try:
        race = await start_race(c)
        await fail_over(c, race)
        epochs = race.primary.epochs
        assert epochs is not None
        key = Keys.nexus_epoch(NEXUS.initiator_port, TARGET)
        stored = await etcd.get(key)
        assert stored is not None and stored.value == race.new.id.encode()
        await epochs.cache.wait_for_revision(stored.mod_revision, 10)
        race.primary.node.epochs = EpochTable(epochs.known)  # memory lost, etcd cache kept
        race.proxy.release()
        with pytest.raises(NexusLost):
            await race.stale
        assert await replica_contents(c) == {n: FRESH for n in c.nodes}
        await race.proxy.stop()
    finally:
        await c.close()


async def test_a_session_end_forgets_only_its_own_login(etcd: Etcd, tmp_path: Path) -> None:
    c = await make_cluster(etcd, tmp_path, fence=True)
    try:
        a, b = c.nodes["chunk-0"], c.nodes["chunk-1"]
        assert a.epochs is not None and b.epochs is not None
        key = Keys.nexus_epoch(NEXUS.initiator_port, TARGET)
        end_a = a.epochs.nexus_started(NEXUS)
        first = await a.epochs.epoch(NEXUS, 10)
        assert first is not None and first.initiator == NEXUS.initiator_port
        end_b = b.epochs.nexus_started(NEXUS)  # the initiator moved to b
        second = await b.epochs.epoch(NEXUS, 10)
        assert second is not None and second.epoch > first.epoch
        end_a()  # a notices its old session is gone: b's login must stay
        await a.epochs.cache.wait_for_revision(await etcd.revision(), 10)
        kv = await etcd.get(key)
        assert kv is not None and kv.mod_revision == second.epoch
        assert await a.epochs.epoch(NEXUS, 10) is None  # no session of it at a any more
        end_b()
        await async_wait_for(_gone(etcd, key), 10, "b's login forgotten at its session's end")
    finally:
        await c.close()


def _gone(etcd: Etcd, key: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await etcd.get(key) is None

    return check


@pytest.mark.parametrize("fence", [True, False], ids=["fencing", "no-fencing"])
async def test_a_stale_write_retried_at_a_new_primary_after_a_failover(
    etcd: Etcd, tmp_path: Path, fence: bool
) -> None:
    # The primary dies with the stale write still held on the old access point's link; the
    # old access point then fails the extent over and retries its write at the new primary
    # (at the new generation, so `gen` alone lets it through). The new primary applied the
    # newer write as a secondary and noted its epoch from the forward: it refuses.
    c = await make_cluster(etcd, tmp_path, fence=fence)
    try:
        race = await start_race(c)
        await fail_over(c, race)
        await c.kill(race.primary.id)  # the held connection breaks: the old write is retried
        if fence:
            with pytest.raises(NexusLost):
                await race.stale
        else:
            await race.stale
        survivors = [race.old.id, race.new.id]

        async def new_primary_open() -> bool:
            rec = race.old.emap.get(VOL, 0)
            return rec is not None and rec.primary in survivors and not rec.converging

        await async_wait_for(new_primary_open, 10, "a survivor as the open primary")
        for n in survivors:
            replica = await c.nodes[n].store.open(VOL, 0)
            assert await replica.read(0, len(FRESH)) == (FRESH if fence else STALE)
        race.proxy.release()
        await race.proxy.stop()
    finally:
        await c.close()
