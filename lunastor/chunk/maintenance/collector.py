"""Deleting the replica files the garbage collector gave up (docs/snapshots.md, "Space reclaim").

Meta's GC planner decides what is garbage: it deletes an extent's map entry and, in the same
transaction, puts one work item per member at `Keys.gc_replica(chunk, store volume, index)`.
Each chunk server follows its own items, deletes the replica's files, then the item. Both
steps are idempotent (a missing replica is already deleted), so a chunk server killed midway
redoes the rest after its restart; nothing else ever deletes replica files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import Counter

from lunastor.chunk.store import ExtentStore, ExtentStoreError
from lunastor.common.etcd import Compare, Delete, Etcd, EtcdError
from lunastor.common.etcd.cache import PrefixCache
from lunastor.common.records import Keys

log = logging.getLogger(__name__)

FREED = Counter("lunastor_gc_replicas_deleted_total", "Replica files deleted by garbage collection")


def parse_item(key: str, prefix: str) -> tuple[str, int] | None:
    """(store volume, extent index) of a work item key under `prefix`; None if malformed."""
    volume, sep, index = key.removeprefix(prefix).rpartition("/")
    if not sep or not volume or not index.isdigit():
        return None
    return volume, int(index)


class ReplicaCollector:
    def __init__(self, etcd: Etcd, store: ExtentStore, chunk_id: str) -> None:
        self.etcd = etcd
        self.store = store
        self.prefix = Keys.gc_replicas(chunk_id)
        self.items = PrefixCache(etcd, self.prefix)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.items.start()
        self._task = asyncio.create_task(self._run(), name="replica collector")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.items.stop()

    async def run_once(self) -> int:
        """Delete every listed replica; the number of items done."""
        done = 0
        for key, kv in list(self.items.items.items()):
            parsed = parse_item(key, self.prefix)
            if parsed is not None and not self.store.owns(*parsed):
                continue  # a sibling worker's replica: that worker deletes it (workers.py)
            if parsed is not None:
                try:
                    if await self.store.remove(*parsed):
                        FREED.inc()
                except ExtentStoreError as exc:  # a failed data dir: keep the item, retry
                    log.warning("cannot delete replica %s/%d: %s", *parsed, exc)
                    continue
            await self.etcd.txn([Compare.mod_revision(key) == kv.mod_revision], [Delete(key)])
            done += 1
        return done

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except EtcdError as exc:
                log.warning("replica collection pass failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await self.items.wait_for(lambda c: bool(c.items), timeout=5.0)
            await asyncio.sleep(0.05)
