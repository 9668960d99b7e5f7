"""What a chunk server watches of the extent map (lunastor/chunk/replication/pagewatch.py),
against a real etcd: only the volumes the reverse index says it holds an extent of (with their
snapshots' preserved copies), plus volumes loaded for IO and dropped after it; every change
to a loaded volume arrives, including one made while its watch was cut off and its revision
compacted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from lunastor.chunk.replication.extentmap import ExtentMap
from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.extent_pages import Change, commit
from lunastor.common.records import ExtentRecord, Keys, preserved_volume
from tests.integration.tcp_proxy import TcpProxy
from tests.support.etcd import EtcdServer

A, B, C = (f"chunk-{i:012x}" for i in (1, 2, 3))
V1, V2, V3, V4 = (f"vol-{i:016x}" for i in (1, 2, 3, 4))


@pytest.fixture(scope="module")
def own_server() -> Iterator[EtcdServer]:
    """Compacted by these tests, so not the shared one."""
    server = EtcdServer().start()
    yield server
    server.cleanup()


@pytest.fixture
async def etcd(own_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[Etcd]:
    config = EtcdConfig(endpoints=[own_server.endpoint], namespace=etcd_prefix, timeout=10)
    async with await Etcd.connect(config) as client:
        yield client


def record(volume: str, index: int, replicas: list[str], gen: int = 1) -> ExtentRecord:
    return ExtentRecord(volume=volume, index=index, gen=gen, replicas=replicas, copies=2)


async def put(etcd: Etcd, *records: ExtentRecord) -> None:
    done = await commit(etcd, [Change(r.volume, r.index, None, r) for r in records])
    assert done is not None


async def set_replicas(emap: ExtentMap, volume: str, index: int, replicas: list[str]) -> None:
    entry = await emap.fresh(volume, index)
    assert entry is not None
    new = record(volume, index, replicas, entry.record.gen + 1)
    assert await emap.replace(entry, new) is not None


async def test_a_server_loads_only_the_volumes_it_holds_and_follows_the_index(
    etcd: Etcd,
) -> None:
    await put(etcd, record(V1, 0, [A, B]), record(V1, 200, [B, C]), record(V2, 0, [B, C]))
    await put(etcd, record(preserved_volume(V1, 3), 0, [A, B]))  # a snapshot's copy
    await put(etcd, *(record(V3, i, [B, C]) for i in range(70)))  # two pages A never holds
    emap = await ExtentMap(etcd, A).start()
    try:
        # V1 (its two pages and its preserved copy), nothing of V2 or V3
        assert emap.extents.families() == [V1]
        assert sorted(emap.ids()) == sorted([(V1, 0), (V1, 200), (preserved_volume(V1, 3), 0)])
        assert emap.get(V2, 0) is None and emap.get(V3, 5) is None
        shards = len(emap.extents.index.items) if emap.extents.index is not None else 0
        assert shards == 2  # one for V1/0, one for V1.e3/0 (different volume names)
        assert emap.extents.watched_keys() == shards + 3

        # an extent allocated onto A elsewhere: its volume is loaded, from the index's change
        other = await ExtentMap(etcd, B).start()
        try:
            await other.transact([Change(V4, 7, None, record(V4, 7, [C, A]))])
            await emap.extents.wait_for(lambda _: emap.get(V4, 7) is not None, 10)
            assert emap.extents.families() == [V1, V4]
            # a change made right after, by another server, arrives
            await set_replicas(other, V4, 7, [C, A, B])
            await emap.wait_newer(V4, 7, 2, 10)
            # A retired from its only extent of V4: V4 is dropped (its last change seen first)
            await set_replicas(other, V4, 7, [C, B])
            await emap.extents.wait_for(lambda _: V4 not in emap.extents.families(), 10)
            assert emap.get(V4, 7) is None
            assert emap.extents.families() == [V1]
        finally:
            await other.stop()
    finally:
        await emap.stop()


async def test_a_volume_in_use_by_io_is_loaded_while_used_and_dropped_after(etcd: Etcd) -> None:
    await put(etcd, record(V2, 0, [B, C]), record(preserved_volume(V2, 1), 0, [B, C]))
    emap = ExtentMap(etcd, A)
    emap.extents.linger, emap.extents.sweep = 0.3, 0.1
    await emap.start()
    try:
        assert emap.extents.families() == [] and emap.get(V2, 0) is None
        async with emap.serving(V2):
            got = emap.get(V2, 0)
            assert got is not None and got.replicas == [B, C]
            assert emap.get(preserved_volume(V2, 1), 0) is not None
            # the watch follows it while in use, longer than the linger
            await asyncio.sleep(0.6)
            await set_replicas(emap, V2, 0, [C, B])
            now = emap.get(V2, 0)
            assert now is not None and now.replicas == [C, B]  # transact waited for the watch
        # a served preserved-copy name loads its volume's family too
        async with emap.serving(preserved_volume(V2, 1)):
            assert emap.extents.families() == [V2]
        await emap.extents.wait_for(lambda _: emap.extents.families() == [], 5)
        assert emap.get(V2, 0) is None and emap.ids() == []
        # and loaded again at the next IO, as etcd has it now
        async with emap.serving(V2):
            again = emap.get(V2, 0)
            assert again is not None and again.gen == 2
    finally:
        await emap.stop()


async def test_a_family_whose_watch_revision_was_compacted_is_reloaded(
    own_server: EtcdServer, etcd: Etcd
) -> None:
    await put(etcd, record(V1, 0, [A, B]), record(V1, 1, [A, B]))
    proxy = await TcpProxy(own_server.endpoint).start()
    config = EtcdConfig([proxy.endpoint], namespace=etcd.config.namespace, timeout=1)
    try:
        async with await Etcd.connect(config) as via_proxy:
            emap = await ExtentMap(via_proxy, A).start()
            try:
                assert sorted(emap.ids()) == [(V1, 0), (V1, 1)]
                proxy.cut()
                writer = ExtentMap(etcd, B)
                await set_replicas(writer, V1, 0, [B, A])
                last = await writer.fresh(V1, 1)
                assert last is not None
                assert await commit(etcd, [Change(V1, 1, last.mod_revision, None)]) is not None
                await etcd.compact(await etcd.put("unrelated", b"x"))
                proxy.restore()
                await emap.extents.wait_for(
                    lambda _: (r := emap.get(V1, 0)) is not None and r.gen == 2, 20
                )
                assert emap.ids() == [(V1, 0)]
                rec = emap.get(V1, 0)
                assert rec is not None and rec.replicas == [B, A]
            finally:
                await emap.stop()
    finally:
        await proxy.stop()


def test_the_family_of_a_store_volume() -> None:
    from lunastor.chunk.replication.pagewatch import family, volume_of_key

    assert family(V1) == V1 and family(preserved_volume(V1, 12)) == V1
    assert volume_of_key(Keys.extent(V1, 3)) == V1
    assert volume_of_key(f"{Keys.EXTENTS}{preserved_volume(V1, 2)}/p0000000") == f"{V1}.e2"
