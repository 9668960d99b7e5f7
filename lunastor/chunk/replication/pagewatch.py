"""The part of the extent map one chunk server watches (docs/scale.md, "What a chunk server
watches").

A cluster of 1,000 servers and a million volumes must not send every change of the map to
every server. A server needs the extents it is a member of (its data path, repair, scrub,
data-dir checks, snapshots of those) and, as an access point, the extents of the volumes its
sessions do IO on. So it watches:

- its own reverse-index shards (`/v1/chunk-extents/<chunk>/`, at most 1,024 keys), which name
  every store volume it is a member of an extent of;
- for each such volume, and for each volume in use by IO here, that volume's **family**: the
  keys under `/v1/extents/<volume>` (its pages, its keys of the layout before pages, and its
  snapshots' preserved copies `<volume>.e<epoch>`, which live on the same servers).

Each family is a `PrefixCache`: one read, then a watch from the revision after that read (no
change between them is lost), re-read when etcd compacted the revision it needs
(`WatchResync`). A family loaded for IO (`serving`) is dropped `linger` seconds after its last
IO ended, unless the reverse index still names it; a family of the reverse index is dropped
when the index stops naming it and no IO uses it.

What is not loaded is unknown, not absent: callers that act on "no such extent" (allocation)
do so only for loaded families (`AccessPath` loads before every lookup), and every change is
an etcd transaction comparing what it read, so a stale or missing view can lose a race but
never win one wrongly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from types import TracebackType

from lunastor.common.etcd import Etcd, KeyValue
from lunastor.common.etcd.cache import PrefixCache
from lunastor.common.extent_pages import decode_shard
from lunastor.common.records import Keys, RecordError, parse_preserved

log = logging.getLogger(__name__)

LINGER = 60.0  # seconds a family loaded for IO stays after its last IO ended
SWEEP = 10.0  # how often families without a reason to stay are dropped


def family(volume: str) -> str:
    """The volume whose prefix holds a store volume's extents (a preserved copy's volume)."""
    parsed = parse_preserved(volume)
    return parsed[0] if parsed is not None else volume


def volume_of_key(key: str) -> str:
    """The store volume of a key under `Keys.EXTENTS` (a page or a key before pages)."""
    return key.removeprefix(Keys.EXTENTS).rpartition("/")[0]


class _Family(PrefixCache):
    def __init__(self, owner: PageWatch, name: str) -> None:
        super().__init__(owner.etcd, f"{Keys.EXTENTS}{name}")
        self.changed = owner.changed  # one condition: a waiter wakes on any family's change
        self._owner = owner

    def applied(self) -> None:
        self._owner.moved(self.revision)


class PageWatch:
    """Keys under `Keys.EXTENTS` of the families this server needs (see the module doc).

    `chunk_id` None: no reverse index (a pure access point: only what IO loads)."""

    def __init__(
        self,
        etcd: Etcd,
        chunk_id: str | None,
        *,
        linger: float = LINGER,
        sweep: float = SWEEP,
    ) -> None:
        self.etcd = etcd
        self.chunk_id = chunk_id
        self.linger = linger
        self.sweep = sweep
        self.changed = asyncio.Condition()
        #: Bumped by every change of what is loaded (an event, a family loaded or dropped).
        self.version = 0
        #: The highest etcd revision any loaded family has reached: every key read from here
        #: has a mod_revision at or below it (a change based on them may take it as its base).
        self.revision = 0
        self.error: BaseException | None = None
        self.index = PrefixCache(etcd, Keys.chunk_extents(chunk_id)) if chunk_id else None
        self._families: dict[str, _Family] = {}
        self._loading: dict[str, asyncio.Future[_Family]] = {}
        self._held: frozenset[str] = frozenset()
        self._users: dict[str, int] = {}
        self._last_use: dict[str, float] = {}
        self._merged: tuple[int, dict[str, KeyValue]] = (-1, {})
        self._tasks: list[asyncio.Task[None]] = []

    # -- life ----------------------------------------------------------------------------------

    async def start(self) -> PageWatch:
        if self.index is not None:
            await self.index.start()
            await self._sync_held()
            self._tasks.append(asyncio.create_task(self._follow_index(), name="extent index"))
        self._tasks.append(asyncio.create_task(self._sweep(), name="extent families"))
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.index is not None:
            await self.index.stop()
        for cache in self._families.values():
            await cache.stop()

    def moved(self, revision: int) -> None:
        self.version += 1
        self.revision = max(self.revision, revision)

    # -- what is loaded ------------------------------------------------------------------------

    def families(self) -> list[str]:
        """The families loaded now."""
        return sorted(self._families)

    def watched_keys(self) -> int:
        """Keys this server follows: its reverse-index shards and the loaded families' keys."""
        shards = len(self.index.items) if self.index is not None else 0
        return shards + len(self.items)

    def loaded(self, volume: str) -> bool:
        return family(volume) in self._families

    def family_revision(self, volume: str) -> int:
        """The etcd revision up to which this volume's family reflects every change (0: not
        loaded). Families are separate watch streams, which etcd does not order against each
        other: only this one says what this volume's extents have seen."""
        cache = self._families.get(family(volume))
        return cache.revision if cache is not None else 0

    def held_volumes(self) -> set[str]:
        """Store volumes the reverse index says we are a member of an extent of."""
        out: set[str] = set()
        if self.index is None:
            return out
        for kv in self.index.items.values():
            try:
                out.update(decode_shard(kv.value))
            except RecordError as exc:
                log.warning("reverse-index shard %s unreadable: %s", kv.key, exc)
        return out

    async def load(self, volume: str) -> None:
        """Load `volume`'s family now if it is not loaded (one read, then its watch)."""
        name = family(volume)
        if name in self._families:
            return
        pending = self._loading.get(name)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._loading[name] = pending
            cache = _Family(self, name)
            try:
                await cache.start()
            except BaseException as exc:
                del self._loading[name]
                pending.set_exception(exc)
                pending.exception()  # retrieved: a waiter may not exist
                raise
            del self._loading[name]
            self._families[name] = cache
            pending.set_result(cache)
            self.moved(cache.revision)
            async with self.changed:
                self.changed.notify_all()
            return
        await asyncio.shield(pending)

    def serving(self, volume: str) -> _Serving:
        """`async with watch.serving(volume):` the family is loaded and stays while in use."""
        return _Serving(self, family(volume))

    async def _drop(self, name: str) -> None:
        cache = self._families.pop(name, None)
        self._last_use.pop(name, None)
        if cache is None:
            return
        await cache.stop()
        self.version += 1
        async with self.changed:
            self.changed.notify_all()

    def _wanted(self, name: str, now: float) -> bool:
        return (
            name in self._held
            or self._users.get(name, 0) > 0
            or now - self._last_use.get(name, 0.0) < self.linger
        )

    async def _sync_held(self) -> None:
        held = frozenset(family(v) for v in self.held_volumes())
        self._held = held
        await asyncio.gather(*(self.load(name) for name in held if name not in self._families))
        await self._drop_unwanted()

    async def _drop_unwanted(self) -> None:
        for name in list(self._families):
            if not self._wanted(name, time.monotonic()):
                await self._drop(name)

    async def _follow_index(self) -> None:
        index = self.index
        assert index is not None
        seen = index.revision
        while True:
            async with index.changed:
                while index.revision == seen:
                    await index.changed.wait()
            seen = index.revision
            try:
                await self._sync_held()
            except Exception as exc:  # etcd unreachable for a while: try again on a change
                log.warning("extent families not synced to the reverse index: %s", exc)
                seen = -1
                await asyncio.sleep(1.0)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep)
            await self._drop_unwanted()

    # -- the PrefixCache view callers use ------------------------------------------------------

    @property
    def items(self) -> Mapping[str, KeyValue]:
        """Every loaded key (a new dict after each change; do not mutate)."""
        if self._merged[0] != self.version:
            merged: dict[str, KeyValue] = {}
            for cache in self._families.values():
                merged.update(cache.items)
            self._merged = (self.version, merged)
        return self._merged[1]

    def get(self, key: str) -> KeyValue | None:
        cache = self._families.get(family(volume_of_key(key)))
        return cache.get(key) if cache is not None else None

    def covers(self, key: str) -> bool:
        """Whether `key` belongs to a loaded family (its absence here means absent)."""
        return family(volume_of_key(key)) in self._families

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        for cache in self._families.values():
            if cache.error is not None:
                raise cache.error

    async def wait_for(
        self, predicate: Callable[[PageWatch], bool], timeout: float | None = None
    ) -> None:
        """Return once `predicate(self)` holds; `TimeoutError` after `timeout` seconds."""

        def ready() -> bool:
            self._check()
            return predicate(self)

        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(ready)

    async def wait_for_key(self, key: str, revision: int, timeout: float | None = None) -> None:
        """Return once the family holding `key` (if loaded) reflects a change of `key` made at
        `revision`: that family's watch delivers it, so its revision reaches it."""
        cache = self._families.get(family(volume_of_key(key)))
        if cache is None or cache.revision >= revision:
            return
        await self.wait_for(
            lambda _: cache.revision >= revision or cache not in self._families.values(), timeout
        )

    async def wait_for_revision(self, revision: int, timeout: float | None = None) -> None:
        """Return once every loaded family reflects every change up to `revision`. A family
        without events since its load cannot tell by its revision: it is compared with a read
        of its prefix made at or after `revision`."""
        async with asyncio.timeout(timeout):
            for name, cache in list(self._families.items()):
                if cache.revision >= revision or self._families.get(name) is not cache:
                    continue
                kvs, rev = await self.etcd.get_prefix(cache.prefix)
                want = {kv.key: kv.mod_revision for kv in kvs}

                def caught_up(
                    _: PageWatch, c: _Family = cache, r: int = rev, w: dict[str, int] = want
                ) -> bool:
                    return c.revision >= r or {k: v.mod_revision for k, v in c.items.items()} == w

                await self.wait_for(caught_up)


class _Serving:
    __slots__ = ("_name", "_watch")

    def __init__(self, watch: PageWatch, name: str) -> None:
        self._watch = watch
        self._name = name

    async def __aenter__(self) -> None:
        w = self._watch
        w._users[self._name] = w._users.get(self._name, 0) + 1
        try:
            await w.load(self._name)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        w = self._watch
        left = w._users.get(self._name, 0) - 1
        if left > 0:
            w._users[self._name] = left
        else:
            w._users.pop(self._name, None)
        w._last_use[self._name] = time.monotonic()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()
