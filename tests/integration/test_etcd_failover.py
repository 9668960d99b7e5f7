"""Failover across the members of a real 3-member etcd cluster when the one in use dies."""

from __future__ import annotations

import asyncio
import time

from lunastor.common.etcd import (
    Etcd,
    EtcdConfig,
    EtcdUnavailable,
    LeaseKeeper,
    WatchEvent,
    WatchItem,
)
from tests.integration.etcd_cluster import EtcdCluster
from tests.support.procs import async_wait_for


async def test_killing_the_member_in_use_moves_reads_writes_watches_and_leases(
    etcd_prefix: str,
) -> None:
    cluster = EtcdCluster(3).start()
    try:
        config = EtcdConfig(cluster.endpoints, namespace=etcd_prefix, timeout=2)
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
            assert victim == cluster.endpoints[0] == config.endpoints[0]
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
