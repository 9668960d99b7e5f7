"""LeaseKeeper against a real etcd: loss is noticed within the TTL, a blocked loop is harmless."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from lunastor.common.etcd import Etcd, EtcdConfig, EtcdError, LeaseKeeper
from tests.support.etcd import EtcdServer
from tests.support.procs import async_wait_for, free_port

TTL = 2


@pytest.fixture
async def etcd(etcd_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[Etcd]:
    config = EtcdConfig(endpoints=[etcd_server.endpoint], namespace=etcd_prefix, timeout=3)
    async with await Etcd.connect(config) as client:
        yield client


async def test_keeps_the_lease_alive_past_its_ttl_and_revokes_on_stop(etcd: Etcd) -> None:
    keeper = await LeaseKeeper(etcd.config, TTL).start()
    await etcd.put("alive", b"x", lease=keeper.lease_id)
    start = time.monotonic()
    while time.monotonic() - start < TTL + 1:
        assert keeper.alive()
        assert keeper.deadline() > time.monotonic()
        await asyncio.sleep(0.2)  # sampling while time passes; the lease must outlive its TTL
    assert await etcd.get("alive") is not None and not keeper.lost.is_set()
    await keeper.stop()
    assert await etcd.get("alive") is None
    assert await etcd.time_to_live(keeper.lease_id) == -1


async def test_stop_without_revoke_leaves_the_lease_to_expire(etcd: Etcd) -> None:
    keeper = await LeaseKeeper(etcd.config, TTL).start()
    await keeper.stop(revoke=False)
    assert await etcd.time_to_live(keeper.lease_id) > 0


async def test_loss_is_noticed_when_the_lease_is_revoked_behind_its_back(etcd: Etcd) -> None:
    called = asyncio.Event()
    keeper = await LeaseKeeper(etcd.config, TTL, on_lost=called.set).start()
    try:
        await etcd.revoke(keeper.lease_id)
        revoked_at = time.monotonic()
        await asyncio.wait_for(called.wait(), TTL)
        assert keeper.lost.is_set() and not keeper.alive()
        assert keeper.deadline() == 0.0
        assert time.monotonic() - revoked_at < TTL
        assert "no longer exists" in keeper.lost_reason
    finally:
        await keeper.stop()


async def test_loss_is_noticed_by_the_deadline_when_etcd_stops(etcd_prefix: str) -> None:
    server = EtcdServer().start()
    try:
        config = EtcdConfig([server.endpoint], namespace=etcd_prefix, timeout=1)
        lost = asyncio.Event()
        keeper = await LeaseKeeper(config, TTL, on_lost=lost.set).start()
        server.stop()
        stopped_at = time.monotonic()
        deadline = keeper.deadline()
        assert deadline <= stopped_at + TTL
        await asyncio.wait_for(lost.wait(), TTL + 1)
        # Lost no earlier than the deadline (the lease was provably alive until then) and
        # promptly after it.
        assert deadline <= time.monotonic() < deadline + 0.5
        assert "deadline" in keeper.lost_reason
        await keeper.stop()
    finally:
        server.cleanup()


async def test_keep_alive_survives_a_blocked_event_loop(etcd: Etcd) -> None:
    keeper = await LeaseKeeper(etcd.config, TTL).start()
    try:
        await etcd.put("busy", b"x", lease=keeper.lease_id)
        # The point of this test: the owner's loop does nothing for twice the TTL.
        time.sleep(2 * TTL)
        assert not keeper.lost.is_set()
        assert keeper.deadline() > time.monotonic()
        assert await etcd.get("busy") is not None
        assert await etcd.time_to_live(keeper.lease_id) > 0
    finally:
        await keeper.stop()


async def test_grant_failure_is_raised_by_start() -> None:
    config = EtcdConfig([f"127.0.0.1:{free_port()}"], timeout=0.5)
    with pytest.raises(EtcdError):
        await LeaseKeeper(config, TTL).start()


async def test_keeper_fails_over_to_another_endpoint(etcd_prefix: str) -> None:
    """Two members of one cluster are out of scope here (see the failover test); a dead first
    endpoint in the list must not prevent granting and keeping the lease on the second."""
    server = EtcdServer().start()
    try:
        dead = f"127.0.0.1:{free_port()}"
        config = EtcdConfig([dead, server.endpoint], namespace=etcd_prefix, timeout=1)
        keeper = await LeaseKeeper(config, TTL).start()
        async with await Etcd.connect(config) as etcd:
            t0 = time.monotonic()
            await async_wait_for(lambda: _refreshed_after(keeper, t0), 3 * TTL, "a keep-alive")
            assert await etcd.time_to_live(keeper.lease_id) > 0
        await keeper.stop()
    finally:
        server.cleanup()


async def _refreshed_after(keeper: LeaseKeeper, t: float) -> bool:
    """A keep-alive sent after `t` succeeded (deadline = its send time + TTL)."""
    return keeper.deadline() - TTL > t


async def test_cancelled_start_does_not_leak_a_kept_lease(etcd: Etcd) -> None:
    keeper = LeaseKeeper(etcd.config, TTL)
    start = asyncio.create_task(keeper.start())
    await asyncio.sleep(0)  # let start() launch the thread, then cancel it mid-grant
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    assert keeper._thread is not None
    await asyncio.to_thread(keeper._thread.join, 5)
    assert not keeper._thread.is_alive()
    if keeper._lease_id:  # granted before the cancellation landed: revoked on the way out
        assert await etcd.time_to_live(keeper._lease_id) == -1
