"""Leader election with real candidates: one leader at a time, takeover on lease loss."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lunastor.common.etcd import (
    Election,
    Etcd,
    EtcdConfig,
    EtcdLeaseLost,
    KeyValue,
    LeaseKeeper,
)
from tests.support.etcd import EtcdServer
from tests.support.procs import async_wait_for

TTL = 2
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def config(etcd_server: EtcdServer, etcd_prefix: str) -> EtcdConfig:
    return EtcdConfig([etcd_server.endpoint], namespace=etcd_prefix, timeout=2)


@pytest.fixture
async def etcd(config: EtcdConfig) -> AsyncIterator[Etcd]:
    async with await Etcd.connect(config) as client:
        yield client


async def _observe(election: Election, out: list[KeyValue | None]) -> None:
    async for leader in election.observe():
        out.append(leader)


async def test_one_leader_at_a_time_and_takeover_on_revoke(config: EtcdConfig, etcd: Etcd) -> None:
    async with LeaseKeeper(config, TTL) as ka, LeaseKeeper(config, TTL) as kb:
        a = Election(etcd, "redirector", b"a", ka.lease_id)
        b = Election(etcd, "redirector", b"b", kb.lease_id)
        assert await a.leader() is None
        leaders: list[KeyValue | None] = []
        observer = asyncio.create_task(_observe(a, leaders))
        await async_wait_for(_nonempty(leaders), 5, "the observer's first answer")
        await a.campaign()
        b_wins = asyncio.create_task(b.campaign())
        await async_wait_for(lambda: _has_key(etcd, b.key), 5, "b's candidate key")
        assert not b_wins.done()
        leader = await a.leader()
        assert leader is not None and (leader.key, leader.value) == (a.key, b"a")

        await etcd.revoke(ka.lease_id)  # a's lease is gone behind its back
        await asyncio.wait_for(b_wins, TTL)
        assert (await b.leader()).value == b"b"  # type: ignore[union-attr]
        await asyncio.wait_for(asyncio.to_thread(ka.lost.wait), TTL)
        await async_wait_for(lambda: _at_least(leaders, 3), 5, "the observer to see b")
        assert [kv.value if kv else None for kv in leaders] == [None, b"a", b"b"]
        observer.cancel()
        await asyncio.gather(observer, return_exceptions=True)


async def test_resign_hands_over_and_a_new_campaign_queues(config: EtcdConfig, etcd: Etcd) -> None:
    async with LeaseKeeper(config, TTL) as ka, LeaseKeeper(config, TTL) as kb:
        a = Election(etcd, "planner", b"a", ka.lease_id)
        b = Election(etcd, "planner", b"b", kb.lease_id)
        await a.campaign()
        b_wins = asyncio.create_task(b.campaign())
        await async_wait_for(lambda: _has_key(etcd, b.key), 5, "b's candidate key")
        await a.resign()
        await asyncio.wait_for(b_wins, 5)
        a_again = asyncio.create_task(a.campaign())
        await async_wait_for(lambda: _has_key(etcd, a.key), 5, "a's new candidate key")
        assert not a_again.done()
        assert (await a.leader()).key == b.key  # type: ignore[union-attr]
        await b.resign()
        await asyncio.wait_for(a_again, 5)


async def test_waiting_candidate_learns_its_lease_is_lost(config: EtcdConfig, etcd: Etcd) -> None:
    async with LeaseKeeper(config, TTL) as ka, LeaseKeeper(config, TTL) as kb:
        a = Election(etcd, "x", b"a", ka.lease_id)
        b = Election(etcd, "x", b"b", kb.lease_id)
        await a.campaign()
        b_wins = asyncio.create_task(b.campaign())
        await async_wait_for(lambda: _has_key(etcd, b.key), 5, "b's candidate key")
        await etcd.revoke(kb.lease_id)
        with pytest.raises(EtcdLeaseLost):
            await asyncio.wait_for(b_wins, 5)


async def test_takeover_within_ttl_when_the_leader_process_is_killed(
    config: EtcdConfig, etcd: Etcd, etcd_server: EtcdServer
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.election_candidate",
         etcd_server.endpoint, config.namespace, "redirector", "other", str(TTL)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 15)
        assert line.startswith("CANDIDATE ")
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 15)
        assert line.startswith("LEADER ")
        other_key = line.split()[1]
        async with LeaseKeeper(config, TTL) as keeper:
            mine = Election(etcd, "redirector", b"me", keeper.lease_id)
            wins = asyncio.create_task(mine.campaign())
            await async_wait_for(lambda: _has_key(etcd, mine.key), 5, "our candidate key")
            assert not wins.done()
            assert (await mine.leader()).key == other_key  # type: ignore[union-attr]
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = time.monotonic()
            await asyncio.wait_for(wins, TTL + 1.5)
            # The dead leader's lease ran out; ours took over no later than TTL after the kill
            # (plus etcd's expiry check granularity).
            assert time.monotonic() - killed_at < TTL + 1.5
            assert (await mine.leader()).key == mine.key  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _nonempty(items: list[KeyValue | None]):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return len(items) > 0

    return check


async def _at_least(items: list[KeyValue | None], n: int) -> bool:
    return len(items) >= n


async def _has_key(etcd: Etcd, key: str) -> bool:
    return await etcd.get(key) is not None
