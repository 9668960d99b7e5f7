"""Snapshot epochs, clone chains, the data-path fence and the GC planner against a real etcd
(docs/snapshots.md). The data path itself is tested in tests/integration/chunk/test_snapshots.py."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from lunastor.common.etcd import Etcd
from lunastor.common.extent_pages import Change
from lunastor.common.records import ExtentRecord, Keys, SnapshotRecord, VolumeRecord
from lunastor.meta import fence, gc
from lunastor.meta.gc import GcPlanner
from tests.integration.meta.conftest import Api, register_chunk
from tests.support.etcd import EtcdServer
from tests.support.procs import async_wait_for


async def record(api: Api, key: str, cls: type[VolumeRecord] | type[SnapshotRecord]) -> object:
    kv = await api.etcd.get(key)
    assert kv is not None, key
    return cls.from_json(kv.value)


async def test_snapshots_freeze_epochs_and_clones_carry_the_chain(api: Api) -> None:
    vol = await api.volume("v")
    s1 = await api.ok("POST", "/v1/snapshots", {"name": "s1", "volume_id": vol["id"]}, 201)
    snap = await record(api, Keys.snapshot(s1["id"]), SnapshotRecord)
    assert isinstance(snap, SnapshotRecord) and (snap.epoch, snap.base) == (0, [])
    v = await record(api, Keys.volume(vol["id"]), VolumeRecord)
    assert isinstance(v, VolumeRecord) and v.epoch == 1
    # a retry answers the same snapshot and bumps nothing
    assert await api.ok("POST", "/v1/snapshots", {"name": "s1", "volume_id": vol["id"]}) == s1
    v = await record(api, Keys.volume(vol["id"]), VolumeRecord)
    assert isinstance(v, VolumeRecord) and v.epoch == 1

    c1 = await api.volume("c1", source={"snapshot_id": s1["id"]})
    c1r = await record(api, Keys.volume(c1["id"]), VolumeRecord)
    assert isinstance(c1r, VolumeRecord) and c1r.base == [{"volume": vol["id"], "epoch": 0}]
    # a clone of a volume is an implicit snapshot: it pins the current epoch and bumps it
    c2 = await api.volume("c2", source={"volume_id": vol["id"]})
    c2r = await record(api, Keys.volume(c2["id"]), VolumeRecord)
    assert isinstance(c2r, VolumeRecord) and c2r.base == [{"volume": vol["id"], "epoch": 1}]
    v = await record(api, Keys.volume(vol["id"]), VolumeRecord)
    assert isinstance(v, VolumeRecord) and v.epoch == 2
    # a snapshot of a clone records the clone's chain; a clone of it extends it
    s2 = await api.ok("POST", "/v1/snapshots", {"name": "s2", "volume_id": c1["id"]}, 201)
    c3 = await api.volume("c3", source={"snapshot_id": s2["id"]})
    c3r = await record(api, Keys.volume(c3["id"]), VolumeRecord)
    assert isinstance(c3r, VolumeRecord)
    assert c3r.base == [{"volume": c1["id"], "epoch": 0}, {"volume": vol["id"], "epoch": 0}]

    await api.ok("DELETE", f"/v1/snapshots/{s1['id']}", status=204)
    tomb = await record(api, Keys.gc_snapshot(s1["id"]), SnapshotRecord)
    assert isinstance(tomb, SnapshotRecord) and tomb.epoch == 0


async def test_a_snapshot_is_answered_once_every_live_data_path_has_seen_it(api: Api) -> None:
    vol = await api.volume("fenced")
    await register_chunk(api.etcd, "chunk-aaaaaaaaaaaa")
    await api.etcd.put(Keys.live_seen("chunk-aaaaaaaaaaaa"), b"1")  # far behind
    await register_chunk(api.etcd, "chunk-bbbbbbbbbbbb")  # never published: no data path
    body = {"name": "f1", "volume_id": vol["id"]}
    call = asyncio.ensure_future(api.call("POST", "/v1/snapshots", body))

    async def committed() -> bool:
        kv = await api.etcd.get(Keys.snapshot_name("f1"))
        return kv is not None

    await async_wait_for(committed, 10, "the snapshot to be committed")
    assert not call.done(), "answered before the chunk server saw the new epoch"
    await api.etcd.put(
        Keys.live_seen("chunk-aaaaaaaaaaaa"), str(await api.etcd.revision()).encode()
    )
    status, snap = await asyncio.wait_for(call, 10)
    assert status == 201 and snap["name"] == "f1"


async def test_a_data_path_that_never_catches_up_is_a_retryable_error(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fence, "FENCE_TIMEOUT", 0.3)
    vol = await api.volume("stuck")
    await register_chunk(api.etcd, "chunk-cccccccccccc")
    await api.etcd.put(Keys.live_seen("chunk-cccccccccccc"), b"1")
    status, body = await api.call("POST", "/v1/snapshots", {"name": "st", "volume_id": vol["id"]})
    assert status == 503 and body["code"] == "data_path_unavailable"
    assert "chunk-cccccccccccc" in body["detail"]
    await api.etcd.delete(Keys.live_chunk("chunk-cccccccccccc"))  # it died: not waited for
    status, _ = await api.call("POST", "/v1/snapshots", {"name": "st", "volume_id": vol["id"]})
    assert status == 200


async def put_extent(api: Api, rec: ExtentRecord) -> None:
    await api.etcd.put(Keys.extent(rec.volume, rec.index), rec.to_json())


async def test_gc_planner_frees_what_nothing_pins(api: Api) -> None:
    vol = await api.volume("g")
    v = vol["id"]
    snap = await api.ok("POST", "/v1/snapshots", {"name": "gs", "volume_id": v}, 201)  # pins (v, 0)
    members = ["chunk-1", "chunk-2"]
    await put_extent(api, ExtentRecord(volume=v, index=0, epoch=0, replicas=members))  # in gs
    await put_extent(api, ExtentRecord(volume=v, index=1, epoch=1, replicas=members))  # after
    await put_extent(  # extent 1 as gs saw it
        api, ExtentRecord(volume=f"{v}.e0", index=1, epoch=0, until=1, replicas=members)
    )
    planner = GcPlanner(api.etcd, batch=1)
    assert await planner.collect_once() == 0  # no tombstone: nothing to look at
    await api.ok("DELETE", f"/v1/volumes/{v}", status=204)

    async def left() -> set[str]:
        kvs, _ = await api.etcd.get_prefix(Keys.EXTENTS)
        return {kv.key for kv in kvs}

    assert await planner.collect_once() == 1  # the live extent 1, newer than the snapshot
    assert await left() == {Keys.extent(v, 0), Keys.extent(f"{v}.e0", 1)}
    items, _ = await api.etcd.get_prefix(Keys.GC_REPLICAS)
    assert {kv.key for kv in items} == {Keys.gc_replica(m, v, 1) for m in members}
    assert await planner.collect_once() == 0
    assert await api.etcd.get(Keys.gc_volume(v)) is not None  # still pinned by gs

    await api.ok("DELETE", f"/v1/snapshots/{snap['id']}", status=204)
    assert await planner.collect_once() == 1  # batch of one: the rest next pass
    assert await planner.collect_once() == 1
    assert await left() == set()
    assert await planner.collect_once() == 0
    assert await api.etcd.get(Keys.gc_volume(v)) is None
    assert await api.etcd.get(Keys.gc_snapshot(snap["id"])) is None


async def test_gc_drops_tombstones_of_volumes_with_nothing_left_in_a_few_transactions(
    api: Api, etcd_server: EtcdServer
) -> None:
    """Deleted volumes never written (CSI create/delete churn) cost a pass a few
    transactions a hundred, not reads per volume and every volume and snapshot record; a
    deleted volume with only a pinned preserved copy left keeps its tombstone."""
    for i in range(150):  # more than one probe transaction and one delete transaction
        await api.etcd.put(Keys.gc_volume(f"vol-empty-{i:03d}"), b"{}")
    kept = (await api.volume("kept"))["id"]
    await api.ok("POST", "/v1/snapshots", {"name": "ks", "volume_id": kept}, 201)  # pins (kept, 0)
    copy = ExtentRecord(volume=f"{kept}.e0", index=0, epoch=0, until=1, replicas=["chunk-1"])
    await put_extent(api, copy)
    await api.ok("DELETE", f"/v1/volumes/{kept}", status=204)
    planner = GcPlanner(api.etcd)

    before = etcd_server.kv_requests()
    assert await planner.collect_once() == 0
    calls = etcd_server.kv_requests() - before
    tombs, _ = await api.etcd.get_prefix(Keys.GC_VOLUMES)
    assert [kv.key for kv in tombs] == [Keys.gc_volume(kept)]  # its copy is pinned
    # 2 tombstone ranges, 3 probe txns, 2 delete txns, then for "kept" alone the pins (2) and
    # its extents (2); the old way was 3 requests per volume: 455
    assert calls == 11, calls
    assert await api.etcd.get(Keys.extent(f"{kept}.e0", 0)) is not None


async def test_gc_reads_the_records_again_only_once_a_pin_may_have_gone(
    api: Api, etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deleted volume whose snapshot is kept stays pinned as long as the snapshot: its
    tombstone is met by every pass. A pin goes only with a snapshot or a clone, so until one
    is deleted those passes read the tombstones (and, with CSI churn beside them, ask whether
    the volumes deleted since were written), not every volume and snapshot record as they
    did. Deleting a clone or a snapshot makes the next pass a full one, and so does every
    FULL_PASS_EVERY-th quiet pass."""
    monkeypatch.setattr(gc, "FULL_PASS_EVERY", 3)
    kept = (await api.volume("pinned"))["id"]
    snap = await api.ok("POST", "/v1/snapshots", {"name": "ps", "volume_id": kept}, 201)
    clone = (await api.volume("clone", source={"snapshot_id": snap["id"]}))["id"]
    await put_extent(api, ExtentRecord(volume=kept, index=0, epoch=0, replicas=["chunk-1"]))
    await api.ok("DELETE", f"/v1/volumes/{kept}", status=204)
    planner = GcPlanner(api.etcd)

    async def requests_of_a_pass(freed: int = 0) -> int:
        before = etcd_server.kv_requests()
        assert await planner.collect_once() == freed
        return etcd_server.kv_requests() - before

    full = await requests_of_a_pass()  # tombstones, probe, the records for the pins, extents
    assert full > 4
    assert [await requests_of_a_pass() for _ in range(3)] == [2, 2, 2]  # the tombstones only
    assert await requests_of_a_pass() == full  # the 4th quiet one reads everything anyway
    assert await requests_of_a_pass() == 2

    for i in range(3):  # churn: volumes never written, no clones; their tombstones go at once
        other = (await api.volume(f"other-{i}"))["id"]
        await api.ok("DELETE", f"/v1/volumes/{other}", status=204)
    assert await requests_of_a_pass() == 4  # tombstones, one probe txn, one delete txn
    assert await requests_of_a_pass() == 2
    assert [kv.key for kv in (await api.etcd.get_prefix(Keys.GC_VOLUMES))[0]] == [
        Keys.gc_volume(kept)
    ]

    await api.ok("DELETE", f"/v1/volumes/{clone}", status=204)  # a pin of (kept, 0) goes
    assert await requests_of_a_pass() == full + 1  # and its tombstone with it
    assert await requests_of_a_pass() == 2
    assert await api.etcd.get(Keys.extent(kept, 0)) is not None  # still pinned by the snapshot

    await api.ok("DELETE", f"/v1/snapshots/{snap['id']}", status=204)
    await requests_of_a_pass(freed=1)  # the last pin went with the snapshot
    assert (await api.etcd.get_prefix(Keys.EXTENTS))[0] == []
    assert await requests_of_a_pass() == 2  # no tombstone left: two empty reads
    assert await api.etcd.get(Keys.gc_volume(kept)) is None


async def test_gc_frees_many_extents_a_transaction_and_skips_one_changed_meanwhile(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = (await api.volume("batched"))["id"]
    members = ["chunk-1", "chunk-2"]
    for i in range(10):
        await put_extent(api, ExtentRecord(volume=v, index=i, replicas=members))
    await api.ok("DELETE", f"/v1/volumes/{v}", status=204)
    real = gc.commit
    sizes: list[int] = []

    async def racing_commit(etcd: Etcd, changes: Sequence[Change], **kw: Any) -> Any:
        sizes.append(len(changes))
        if len(sizes) == 1:  # a writer changes extent 3 between the GC's read and its commit
            await put_extent(api, ExtentRecord(volume=v, index=3, epoch=1, replicas=members))
        return await real(etcd, changes, **kw)

    monkeypatch.setattr(gc, "commit", racing_commit)
    planner = GcPlanner(api.etcd)
    assert await planner.collect_once() == 9
    # the first 8 in one transaction, which failed: then one by one; then the last 2 together
    assert sizes == [8, 1, 1, 1, 1, 1, 1, 1, 1, 2]
    left, _ = await api.etcd.get_prefix(Keys.EXTENTS)
    assert [kv.key for kv in left] == [Keys.extent(v, 3)]
    assert await api.etcd.get(Keys.gc_volume(v)) is not None  # not everything is freed yet
    monkeypatch.undo()
    assert await planner.collect_once() == 1  # the changed one, looked at again
    assert (await api.etcd.get_prefix(Keys.EXTENTS))[0] == []
    assert await api.etcd.get(Keys.gc_volume(v)) is None
    work, _ = await api.etcd.get_prefix(Keys.GC_REPLICAS)
    assert {kv.key for kv in work} == {Keys.gc_replica(m, v, i) for i in range(10) for m in members}
