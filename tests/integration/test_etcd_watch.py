"""Watches that outlive an etcd restart and a compaction, on an etcd of their own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from lunastor.common.etcd import (
    Etcd,
    EtcdCompacted,
    EtcdConfig,
    EventType,
    KeyValue,
    PrefixCache,
    WatchEvent,
    WatchItem,
    WatchResync,
)
from tests.integration.tcp_proxy import TcpProxy
from tests.support.etcd import EtcdServer
from tests.support.procs import async_wait_for


@pytest.fixture(scope="module")
def own_server() -> Iterator[EtcdServer]:
    """Restarted and compacted by these tests, so not the shared one."""
    server = EtcdServer().start()
    yield server
    server.cleanup()


@pytest.fixture
async def etcd(own_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[Etcd]:
    config = EtcdConfig(endpoints=[own_server.endpoint], namespace=etcd_prefix, timeout=1)
    async with await Etcd.connect(config) as client:
        yield client


class Collector:
    """Consumes a watch in a task, so the test can write while it runs."""

    def __init__(self, it: AsyncIterator[WatchItem]) -> None:
        self.items: list[WatchItem] = []
        self.task = asyncio.create_task(self._run(it))

    async def _run(self, it: AsyncIterator[WatchItem]) -> None:
        async for item in it:
            self.items.append(item)

    async def wait_len(self, n: int, timeout: float = 10) -> list[WatchItem]:
        async def enough() -> bool:
            if self.task.done():
                self.task.result()  # surface the watch's error
            return len(self.items) >= n

        await async_wait_for(enough, timeout, f"{n} watch items (have {len(self.items)})")
        return self.items

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_watch_resumes_after_an_etcd_restart_without_loss_or_duplicates(
    own_server: EtcdServer, etcd: Etcd
) -> None:
    _, rev = await etcd.get_prefix("w/")
    watch = Collector(etcd.watch_prefix("w/", rev + 1))
    try:
        before = [await etcd.put(f"w/{i}", b"before") for i in range(3)]
        await watch.wait_len(3)
        own_server.stop()
        own_server.start()
        after = [await etcd.put(f"w/{i}", b"after") for i in range(3, 6)]
        after.append(await etcd.put("w/0", b"after"))
        items = await watch.wait_len(7)
        await asyncio.sleep(0)  # nothing else may arrive: no duplicates
        assert all(isinstance(i, WatchEvent) for i in items)
        revs = [i.revision for i in items]
        assert revs == before + after
        assert [i.kv.key for i in items] == [f"w/{i}" for i in range(6)] + ["w/0"]  # type: ignore[union-attr]
    finally:
        await watch.close()


async def test_watch_from_a_compacted_revision_resyncs_then_continues(etcd: Etcd) -> None:
    await etcd.put("r/a", b"1")
    await etcd.put("r/b", b"1")
    _, listed_at = await etcd.get_prefix("r/")
    await etcd.put("r/c", b"1")
    await etcd.delete("r/a")
    now = await etcd.put("r/b", b"2")
    await etcd.compact(now)
    watch = Collector(etcd.watch_prefix("r/", listed_at + 1))
    try:
        first = (await watch.wait_len(1))[0]
        assert isinstance(first, WatchResync)
        assert first.revision >= now
        assert [(kv.key, kv.value) for kv in first.kvs] == [("r/b", b"2"), ("r/c", b"1")]
        rev = await etcd.delete("r/c") and await etcd.revision()
        items = await watch.wait_len(2)
        assert isinstance(items[1], WatchEvent)
        assert (items[1].type, items[1].kv.key, items[1].revision) == (EventType.DELETE, "r/c", rev)
    finally:
        await watch.close()


async def test_reading_a_compacted_revision_is_a_typed_error(etcd: Etcd) -> None:
    rev = await etcd.put("c", b"1")
    await etcd.compact(await etcd.put("c", b"2"))
    with pytest.raises(EtcdCompacted):
        await etcd.get_prefix("c", revision=rev)


async def test_prefix_cache_recovers_from_a_restart(own_server: EtcdServer, etcd: Etcd) -> None:
    await etcd.put("chunk/1", b"up")
    async with PrefixCache(etcd, "chunk/") as cache:
        own_server.stop()
        own_server.start()
        rev = await etcd.put("chunk/2", b"up")
        await etcd.delete("chunk/1")
        rev = await etcd.revision()
        await cache.wait_for_revision(rev, timeout=10)
        assert dict(cache.items) == {"chunk/2": KeyValue("chunk/2", b"up", rev - 1, rev - 1, 1)}


async def test_watch_cut_off_while_its_revision_is_compacted_resyncs(
    own_server: EtcdServer, etcd: Etcd
) -> None:
    proxy = await TcpProxy(own_server.endpoint).start()
    config = EtcdConfig([proxy.endpoint], namespace=etcd.config.namespace, timeout=1)
    try:
        async with await Etcd.connect(config) as via_proxy:
            await etcd.put("m/gone", b"1")
            _, rev = await etcd.get_prefix("m/")
            watch = Collector(via_proxy.watch_prefix("m/", rev + 1))
            async with PrefixCache(via_proxy, "m/") as cache:
                first = await etcd.put("m/a", b"1")
                await watch.wait_len(1)
                proxy.cut()
                # While the watcher cannot reach etcd: changes, then history is compacted.
                await etcd.put("m/b", b"1")
                await etcd.delete("m/gone")
                now = await etcd.put("m/a", b"2")
                await etcd.compact(now)
                proxy.restore()
                items = await watch.wait_len(2)
                assert isinstance(items[0], WatchEvent) and items[0].revision == first
                resync = items[1]
                assert isinstance(resync, WatchResync) and resync.revision >= now
                assert {kv.key: kv.value for kv in resync.kvs} == {"m/a": b"2", "m/b": b"1"}
                later = await etcd.put("m/c", b"1")
                items = await watch.wait_len(3)
                assert isinstance(items[2], WatchEvent) and items[2].revision == later
                await cache.wait_for_revision(later, timeout=5)
                assert sorted(cache.items) == ["m/a", "m/b", "m/c"]
            await watch.close()
    finally:
        await proxy.stop()
