"""`PrefixCache`: a local, always-current copy of every key under one prefix (list + watch)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from lunastor.common.etcd.model import EventType, KeyValue, WatchResync

if TYPE_CHECKING:
    from lunastor.common.etcd.client import Etcd

log = logging.getLogger(__name__)


class PrefixCache:
    """Follows `prefix`: `items` maps key -> KeyValue as of `revision`.

    Waiters on `changed` (an asyncio.Condition) are woken after each batch of events; etcd
    delivers a revision in one batch, so they never see half of a transaction.
    """

    def __init__(self, etcd: Etcd, prefix: str) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.revision = 0
        self.changed = asyncio.Condition()
        #: Set when following stopped on an error that retrying cannot fix.
        self.error: BaseException | None = None
        self._items: dict[str, KeyValue] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> PrefixCache:
        kvs, self.revision = await self.etcd.get_prefix(self.prefix)
        self._items = {kv.key: kv for kv in kvs}
        self._task = asyncio.create_task(self._follow(), name=f"prefix-cache {self.prefix}")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aenter__(self) -> PrefixCache:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def items(self) -> Mapping[str, KeyValue]:
        """Read-only view of the current keys."""
        return MappingProxyType(self._items)

    def get(self, key: str) -> KeyValue | None:
        return self._items.get(key)

    async def wait_for(
        self, predicate: Callable[[PrefixCache], bool], timeout: float | None = None
    ) -> None:
        """Return once `predicate(self)` holds; `TimeoutError` after `timeout` seconds."""

        def ready() -> bool:
            if self.error is not None:
                raise self.error
            return predicate(self)

        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(ready)

    async def wait_for_revision(self, revision: int, timeout: float | None = None) -> None:
        """Return once the cache reflects every change up to `revision` under the prefix."""
        await self.wait_for(lambda c: c.revision >= revision, timeout)

    async def catch_up(self, timeout: float | None = None) -> None:
        """Return once the cache holds every key etcd holds under the prefix now (the watch
        delivers a change some time after it committed; deletions since may still be in it):
        one read of the newest mod revision there, then `wait_for_revision`."""
        async with asyncio.timeout(timeout):
            await self.wait_for_revision(await self.etcd.newest_revision(self.prefix))

    def applied(self) -> None:
        """Called after each event is applied, before waiters wake (a hook for subclasses)."""

    async def _follow(self) -> None:
        try:
            async for item in self.etcd.watch_prefix(self.prefix, self.revision + 1):
                if isinstance(item, WatchResync):
                    self._items = {kv.key: kv for kv in item.kvs}
                elif item.type is EventType.PUT:
                    self._items[item.kv.key] = item.kv
                else:
                    self._items.pop(item.kv.key, None)
                self.revision = item.revision
                self.applied()
                async with self.changed:
                    self.changed.notify_all()
        except Exception as exc:
            log.error("prefix cache %r stopped: %s", self.prefix, exc)
            self.error = exc
            async with self.changed:
                self.changed.notify_all()


async def catch_up_all(caches: Iterable[PrefixCache], timeout: float) -> None:
    """Return once every one of `caches` holds what etcd holds now under its prefix
    (`PrefixCache.catch_up`, all at once); TimeoutError after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        await asyncio.gather(*(c.catch_up() for c in caches))
