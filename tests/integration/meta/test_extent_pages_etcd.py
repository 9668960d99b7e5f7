"""The paged extent map against a real etcd (lunastor/common/extent_pages.py): concurrent
changes to extents of one page all land and keep the reverse index exact; racing changes to
one extent have one winner; a map written in the layout before pages (today's
`ExtentRecord` JSON, one key per extent) is read as it is and moved into pages in place;
the GC frees migrated extents and hands work to former members too."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator

import pytest

from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.extent_pages import (
    MOVED,
    PAGE_EXTENTS,
    Change,
    commit,
    decode_entries,
    decode_shard,
    extent_keys,
    held_counts,
    read_keys,
)
from lunastor.common.records import ExtentRecord, Keys, VolumeRecord
from lunastor.meta.extent_migration import ExtentMigrator
from lunastor.meta.gc import GcPlanner
from tests.support.etcd import EtcdServer

V = "vol-00000000000000aa"
SERVERS = [f"chunk-{i:012x}" for i in range(1, 6)]


@pytest.fixture
async def etcd(etcd_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[Etcd]:
    config = EtcdConfig(endpoints=[etcd_server.endpoint], namespace=etcd_prefix, timeout=10)
    async with await Etcd.connect(config) as client:
        yield client


async def entries(etcd: Etcd) -> dict[tuple[str, int], tuple[ExtentRecord, int]]:
    kvs, _ = await etcd.get_prefix(Keys.EXTENTS)
    return {(r.volume, r.index): (r, s) for r, s in decode_entries(kvs)}


async def assert_index_exact(etcd: Etcd) -> None:
    """The reverse index lists exactly the members the pages name."""
    index, _ = await etcd.get_prefix(Keys.CHUNK_EXTENTS)
    listed: set[tuple[str, str, int]] = set()
    for kv in index:
        chunk = kv.key.removeprefix(Keys.CHUNK_EXTENTS).partition("/")[0]
        for vol, ixs in decode_shard(kv.value).items():
            assert ixs, "an empty entry is left in a shard"
            listed |= {(chunk, vol, i) for i in ixs}
    named = {(m, r.volume, r.index) for r, _ in (await entries(etcd)).values() for m in r.replicas}
    assert listed == named


async def test_concurrent_changes_to_one_page_all_land(etcd: Etcd) -> None:
    rng = random.Random(7)
    n = PAGE_EXTENTS  # every extent of one page, each allocated then changed 3 times

    async def writer(index: int) -> int:
        tries = 0
        rec = ExtentRecord(V, index, replicas=rng.sample(SERVERS, 3), copies=3)
        done = await commit(etcd, [Change(V, index, None, rec)])
        assert done is not None
        stamp = done.stamp
        for gen in range(2, 5):
            rec = dataclasses.replace(rec, gen=gen, replicas=rng.sample(SERVERS, 3))
            done = await commit(etcd, [Change(V, index, stamp, rec)])
            assert done is not None, f"extent {index} lost a change nobody else made"
            stamp = done.stamp
            tries += 1
        return tries

    await asyncio.gather(*(writer(i) for i in range(n)))
    found = await entries(etcd)
    assert sorted(i for _, i in found) == list(range(n))
    assert all(r.gen == 4 for r, _ in found.values())
    await assert_index_exact(etcd)
    held = held_counts((await etcd.get_prefix(Keys.CHUNK_EXTENTS))[0], [])
    assert sum(held.values()) == 3 * n


async def test_racing_changes_to_one_extent_have_one_winner(etcd: Etcd) -> None:
    base = await commit(etcd, [Change(V, 5, None, ExtentRecord(V, 5, replicas=SERVERS[:3]))])
    assert base is not None
    proposals = [ExtentRecord(V, 5, gen=2, replicas=[s]) for s in SERVERS]
    done = await asyncio.gather(*(commit(etcd, [Change(V, 5, base.stamp, p)]) for p in proposals))
    winners = [p for p, d in zip(proposals, done, strict=True) if d is not None]
    assert len(winners) == 1
    rec, _ = (await entries(etcd))[(V, 5)]
    assert rec.replicas == winners[0].replicas
    assert sorted(rec.strays) == sorted(set(SERVERS[:3]) - set(rec.replicas))
    await assert_index_exact(etcd)


async def test_a_map_of_the_old_layout_is_read_and_moved_into_pages(etcd: Etcd) -> None:
    """Keys and values exactly as the code before pages wrote them; the new code reads them,
    changes one (which moves it), the migrator moves the rest, the GC then frees them all and
    gives every member and former member its work item."""
    old = {
        (V, i): ExtentRecord(V, i, gen=2, replicas=SERVERS[i % 3 : i % 3 + 3], copies=3)
        for i in range(40)
    }
    old[(f"{V}.e0", 3)] = ExtentRecord(f"{V}.e0", 3, replicas=SERVERS[:2], until=1)
    for (vol, i), rec in old.items():
        await etcd.put(Keys.extent(vol, i), rec.to_json())
    found = await entries(etcd)
    assert {k: r for k, (r, _) in found.items()} == old
    # one change through the new code: moved into its page, a marker at the old key
    rec, stamp = found[(V, 0)]
    changed = dataclasses.replace(rec, gen=3, replicas=[SERVERS[4], *rec.replicas[1:]])
    assert await commit(etcd, [Change(V, 0, stamp, changed)]) is not None
    kvs, _ = await read_keys(etcd, extent_keys(V, 0))
    marker = kvs[Keys.extent(V, 0)]
    assert marker is not None and marker.value == MOVED
    migrator = ExtentMigrator(etcd, batch=16)
    moved = 0
    while n := await migrator.migrate_once():
        moved += n
    assert moved == len(old) - 1
    now = await entries(etcd)
    expect = {**old, (V, 0): dataclasses.replace(changed, strays=[rec.replicas[0]])}
    assert {k: r for k, (r, _) in now.items()} == expect
    legacy = [kv for kv in (await etcd.get_prefix(Keys.EXTENTS))[0] if "/p" not in kv.key]
    assert {kv.value for kv in legacy} == {MOVED}
    await assert_index_exact(etcd)

    # the volume is deleted: GC frees every extent, members and the stray get work
    await etcd.put(Keys.gc_volume(V), VolumeRecord(id=V).to_json())
    gc = GcPlanner(etcd, batch=1000)
    while await gc.collect_once():
        pass
    assert (await etcd.get_prefix(Keys.EXTENTS))[0] == []
    assert (await etcd.get_prefix(Keys.CHUNK_EXTENTS))[0] == []
    items, _ = await etcd.get_prefix(Keys.GC_REPLICAS)
    work = {kv.key for kv in items}
    wanted = {Keys.gc_replica(m, v, i) for (v, i), r in expect.items() for m in r.replicas}
    assert Keys.gc_replica(rec.replicas[0], V, 0) in work  # the former member's files
    assert work == wanted | {Keys.gc_replica(rec.replicas[0], V, 0)}
