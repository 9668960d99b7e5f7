"""The start-up grace of lunastor/chunk/maintenance/restart.py against a real etcd: a chunk
server registered but not live when this one started is expected back for `restart_grace`;
once it has been seen live, its death is a crash like any other, whether or not anybody
asked about it while it was live (nobody asks about a member that serves: a victim SIGKILLed
within the grace of a survivor's start was waited for until the grace ran out: the likely
cause of a ~28 s IO gap in one CI run of test_redirector_failover_netns.py, whose survivors
log servers missing at start)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from lunastor.chunk.maintenance.restart import Returns
from lunastor.chunk.replication.extentmap import ExtentMap
from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.records import ChunkServerInfo, ChunkServerStatus, Keys
from tests.support.etcd import EtcdServer
from tests.support.procs import async_wait_for

ME, LATE, NEVER = (f"chunk-{i:012x}" for i in (1, 2, 3))
GRACE = 600.0  # far longer than the test: only the grace's rules can end it


@pytest.fixture
async def etcd(etcd_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[Etcd]:
    config = EtcdConfig(endpoints=[etcd_server.endpoint], namespace=etcd_prefix, timeout=10)
    async with await Etcd.connect(config) as client:
        yield client


async def register(etcd: Etcd, chunk_id: str) -> None:
    info = ChunkServerInfo(id=chunk_id, portal="127.0.0.1:3260", data_address="127.0.0.1:1")
    await etcd.put(Keys.chunk(chunk_id), info.to_json())


async def go_live(etcd: Etcd, chunk_id: str) -> None:
    status = ChunkServerStatus(id=chunk_id, portal="127.0.0.1:3260", data_address="127.0.0.1:1")
    await etcd.put(Keys.live_chunk(chunk_id), status.to_json())


async def test_a_server_seen_live_after_our_start_and_dead_again_is_not_waited_for(
    etcd: Etcd,
) -> None:
    for chunk_id in (ME, LATE, NEVER):
        await register(etcd, chunk_id)
    await go_live(etcd, ME)
    emap = await ExtentMap(etcd, ME).start()
    returns = await Returns(etcd, emap, ME, grace=GRACE).start()
    try:
        # both registered and not live when we started: a cluster coming back, waited for
        assert returns.missing_at_start == {LATE, NEVER}
        assert returns.expected(LATE) and returns.expected(NEVER)

        # LATE comes up and dies, nobody asking about it meanwhile
        await go_live(etcd, LATE)
        await async_wait_for(
            lambda: _true(emap.is_live(LATE)), 10, "our cache to see LATE's live record"
        )
        await etcd.delete(Keys.live_chunk(LATE))
        await async_wait_for(
            lambda: _true(not emap.is_live(LATE)), 10, "our cache to see it vanish"
        )
        await async_wait_for(
            lambda: _true(not returns.expected(LATE)), 10, "LATE's crash to end its grace"
        )
        # NEVER has not been seen live: still waited for, until the grace runs out
        assert returns.expected(NEVER)
    finally:
        await returns.stop()
        await emap.stop()


async def _true(value: bool) -> bool:
    return value
