"""What the planner leader's passes read, against a real etcd (issue 17: a million LUNs).

Every `planner_interval` (5 s) the leader runs each planner. The rebuild reporter and the
rebalancer used to read and decode every volume record on every pass: ~45 ms of meta's CPU
per 1,000 volumes a pass, so a leader of a million mostly unwritten (thin) volumes could not
keep up, and every listing that met a pass paid for it. They need the volumes only for the
extents in the map (desired replicas, zones), and the rebuild reporter needs the extent map
only while a server is lost or a rebuild is being reported.
"""

from __future__ import annotations

import time

from lunastor.common.etcd import Put
from lunastor.common.extent_pages import Change, commit
from lunastor.common.records import ChunkServerInfo, ExtentRecord, Keys, VolumeRecord
from lunastor.meta.planners import ExtentCensus, RebuildPlanner
from lunastor.meta.rebalance import RebalancePlanner
from tests.integration.meta.conftest import Api, register_chunk
from tests.support.etcd import EtcdServer

UNWRITTEN = 2_500  # more than two pages of etcd reads (1000 keys a page)


async def passes(api: Api, etcd_server: EtcdServer) -> int:
    """etcd requests of one rebuild-reporter pass and one rebalancer pass."""
    before = etcd_server.kv_requests()
    await RebuildPlanner(api.etcd).run_once()
    await RebalancePlanner(api.etcd).run_once()
    return etcd_server.kv_requests() - before


async def add_volumes(api: Api, count: int, replicas: int = 3) -> list[str]:
    ids = [f"vol-{i:016x}" for i in range(count)]
    for start in range(0, count, 100):
        records = [VolumeRecord(id=v, name=v, size_bytes=1 << 30, replicas=replicas)
                   for v in ids[start : start + 100]]  # fmt: skip
        await api.etcd.txn([], [Put(Keys.volume(r.id), r.to_json()) for r in records])
    return ids


async def test_passes_do_not_read_unwritten_volumes(api: Api, etcd_server: EtcdServer) -> None:
    for chunk in ("chunk-a", "chunk-b", "chunk-c"):
        await register_chunk(api.etcd, chunk)
    empty = await passes(api, etcd_server)
    await add_volumes(api, UNWRITTEN)
    assert await passes(api, etcd_server) == empty  # reads the volumes would add >= 3 pages


async def test_the_census_reads_the_volumes_of_the_extents_and_a_lost_server_is_reported(
    api: Api, etcd_server: EtcdServer
) -> None:
    for chunk in ("chunk-a", "chunk-b", "chunk-c"):
        await register_chunk(api.etcd, chunk)
    ids = await add_volumes(api, UNWRITTEN, replicas=2)
    written = ids[7]
    extent = ExtentRecord(volume=written, index=0, epoch=0, replicas=["chunk-a", "chunk-b"])
    assert await commit(api.etcd, [Change(written, 0, None, extent)]) is not None
    census = await ExtentCensus.read(api.etcd)
    assert census.desired == {written: 2}  # only the written volume's record is decoded
    assert census.unrestored("chunk-a") == 1

    # a registered server without a live record: the reporter reads the census and reports
    lost = ChunkServerInfo(id="chunk-gone", portal="127.0.0.1:3999", registered_at=time.time())
    await api.etcd.put(Keys.chunk(lost.id), lost.to_json())
    extent_on_lost = ExtentRecord(
        volume=ids[8], index=0, epoch=0, replicas=["chunk-a", "chunk-gone"]
    )
    assert await commit(api.etcd, [Change(ids[8], 0, None, extent_on_lost)]) is not None
    await RebuildPlanner(api.etcd).run_once()
    ops, _ = await api.etcd.get_prefix(Keys.OPERATIONS)
    rebuilds = [kv for kv in ops if b'"rebuild"' in kv.value and b"chunk-gone" in kv.value]
    assert len(rebuilds) == 1, [kv.value for kv in ops]
