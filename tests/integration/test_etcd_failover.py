"""Failover across the members of a real 3-member etcd cluster when the one in use dies."""

from __future__ import annotations

import asyncio
import time

from lunastor.common.etcd import (
    Compare,
    Etcd,
    EtcdConfig,
    EtcdUnavailable,
    LeaseKeeper,
    Put,
    WatchEvent,
    WatchItem,
)
from tests.integration.etcd_cluster import EtcdCluster
from tests.support.procs import async_wait_for, wait_for


async def test_killing_the_member_in_use_moves_reads_writes_watches_and_leases(
    etcd_prefix: str,
) -> None:
    cluster = EtcdCluster(3).start()
    try:
        # The member in use is a follower: killing the raft leader also costs an election
        # (about 1-2 s here), longer than a 2 s lease can absorb; that is a TTL-sizing
        # matter (see docs/etcd-client.md), not the failover this test is about.
        leader = wait_for(cluster.leader, 10, "an etcd leader")
        followers = [e for e in cluster.endpoints if e != leader]
        endpoints = [followers[0], leader, followers[1]]
        config = EtcdConfig(endpoints, namespace=etcd_prefix, timeout=2)
        async with await Etcd.connect(config) as etcd:
            keeper = await LeaseKeeper(config, 2).start()
            await etcd.put("leased", b"x", lease=keeper.lease_id)
            _, rev = await etcd.get_prefix("w/")
            seen: list[WatchItem] = []

            async def follow() -> None:
                async for item in etcd.watch_prefix("w/", rev + 1):
                    seen.append(item)

            watcher = asyncio.create_task(follow())
            before = await etcd.put("w/1", b"before")
            await async_wait_for(_len_at_least(seen, 1), 5, "the first watch event")

            victim = etcd.endpoint
            assert victim == config.endpoints[0] != leader
            cluster.kill(victim)
            killed_at = time.monotonic()

            # A write that was already on its way to the dead member is not retried (it may
            # have been applied: etcd's own client does the same), but the client moves on.
            try:
                first_after: int | None = await etcd.put("w/0", b"first call after the kill")
            except EtcdUnavailable:
                first_after = None
            assert etcd.endpoint != victim
            kv = await etcd.get("w/1")  # the next call goes to another member
            assert kv is not None and kv.mod_revision == before
            assert etcd.endpoint != victim
            after = [await etcd.put(f"w/{i}", b"after") for i in range(2, 5)]
            await async_wait_for(_seen_rev(seen, after[-1]), 10, "watch events after the kill")
            assert all(isinstance(i, WatchEvent) for i in seen)
            # When the first write's fate is unknown, its event may or may not be there.
            observed = [i.revision for i in seen if first_after or i.kv.key != "w/0"]  # type: ignore[union-attr]
            assert observed == [before, *([first_after] if first_after else []), *after]

            # The keeper (its own channel, maybe to the dead member) keeps the lease alive.
            await async_wait_for(
                _refreshed_after(keeper, killed_at), 6, "a keep-alive after the kill"
            )
            assert not keeper.lost.is_set()
            assert await etcd.get("leased") is not None
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await keeper.stop()
    finally:
        cluster.cleanup()


def _len_at_least(items: list[WatchItem], n: int):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return len(items) >= n

    return check


def _seen_rev(items: list[WatchItem], rev: int):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return any(i.revision == rev for i in items)

    return check


def _refreshed_after(keeper: LeaseKeeper, t: float):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return keeper.deadline() - keeper.ttl > t

    return check


async def test_killing_the_raft_leader_in_use_costs_an_election_not_data(
    etcd_prefix: str,
) -> None:
    cluster = EtcdCluster(3).start()
    try:
        leader = wait_for(cluster.leader, 10, "an etcd leader")
        endpoints = [leader, *(e for e in cluster.endpoints if e != leader)]
        config = EtcdConfig(endpoints, namespace=etcd_prefix, timeout=2)
        async with await Etcd.connect(config) as etcd:
            # A TTL comfortably above election time + ttl/3 survives losing the leader.
            keeper = await LeaseKeeper(config, 5).start()
            _, rev = await etcd.get_prefix("w/")
            seen: list[WatchItem] = []

            async def follow() -> None:
                async for item in etcd.watch_prefix("w/", rev + 1):
                    seen.append(item)

            watcher = asyncio.create_task(follow())
            before = await etcd.put("w/1", b"before")
            await async_wait_for(_len_at_least(seen, 1), 5, "the first watch event")
            cluster.kill(leader)

            async def put_after() -> bool:
                # During the election a write may fail (EtcdUnavailable/EtcdTimeout) and may
                # even have been applied: the caller retries, as daemons do, and the compare
                # makes the retry safe. Once a txn completes, w/2 exists.
                await etcd.txn([Compare.version("w/2") == 0], [Put("w/2", b"after")])
                return True

            await async_wait_for(put_after, 15, "a write after the leader died")
            after = (await etcd.get("w/2")).mod_revision  # type: ignore[union-attr]
            assert etcd.endpoint != leader
            await async_wait_for(_seen_rev(seen, after), 10, "the watch event after the kill")
            assert [i.revision for i in seen] == [before, after]
            assert not keeper.lost.is_set() and keeper.alive()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await keeper.stop()
    finally:
        cluster.cleanup()
