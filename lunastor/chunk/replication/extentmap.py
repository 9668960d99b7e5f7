"""The extent map as a chunk server sees it: a watched copy of etcd, plus the transactions that
change it (allocation, removing a replica, promoting a new primary). docs/datapath.md.

The map is stored in pages of extents with a reverse index (`lunastor.common.extent_pages`).
Every change is one etcd transaction that holds only if the extent still carries the stamp
the caller read (or is still absent), so two chunk servers racing for the same change cannot
both win; the loser re-reads. A concurrent change to another extent of the same page never
makes a change lose: the transaction is re-planned on the current page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lunastor.chunk.replication.pagewatch import PageWatch
from lunastor.chunk.replication.ring import RingError, Server, bootstrap_ring
from lunastor.common.etcd import Etcd, KeyValue
from lunastor.common.etcd.cache import PrefixCache
from lunastor.common.extent_pages import (
    MOVED,
    Change,
    commit,
    decode_kv,
    extent_keys,
    page_key,
    read_keys,
)
from lunastor.common.records import (
    ChunkServerInfo,
    ChunkServerStatus,
    ExtentRecord,
    Keys,
    RecordError,
    VolumeRecord,
)
from lunastor.common.ring import PlacementError, Ring
from lunastor.common.zoning import restrict_to_zones


class AllocationError(Exception):
    """No replica set can be chosen now (too few chunk servers up): retry later."""


KEYS_MEMO = 65536  # extents whose keys `ExtentMap.entry` keeps formatted (then starts over)


@dataclass(frozen=True, slots=True)
class Entry:
    record: ExtentRecord
    # The extent's own change stamp (common/extent_pages.py): equal stamps mean the same
    # state of this extent; it is passed back to `replace` as what the change is based on.
    mod_revision: int


class ExtentMap:
    """`chunk_id`: the server whose extents (by the reverse index) are always loaded; None
    for a pure access point. Other volumes' extents are loaded by `serving` (pagewatch.py)."""

    def __init__(self, etcd: Etcd, chunk_id: str | None = None) -> None:
        self.etcd = etcd
        self.extents = PageWatch(etcd, chunk_id)
        self.live = PrefixCache(etcd, Keys.LIVE_CHUNKS)
        self.chunks = PrefixCache(etcd, Keys.CHUNKS)
        self.admin = PrefixCache(etcd, Keys.CHUNK_ADMIN)  # drains: no new extents there
        # volumes: their snapshot epoch and clone base (docs/snapshots.md)
        self.volumes = PrefixCache(etcd, Keys.VOLUMES)
        self._volumes: dict[str, tuple[int, VolumeRecord]] = {}
        # key under EXTENTS -> (its mod_revision, the entries it holds by (volume, index))
        self._decoded: dict[str, tuple[int, dict[tuple[str, int], Entry]]] = {}
        self._ids: tuple[int, list[tuple[str, int]]] = (-1, [])
        self._newest: tuple[int, int] = (-1, 0)  # (map version, newest mod_revision)
        # chunk record key -> (mod_revision, data address): every forwarded write asks
        self._addresses: dict[str, tuple[int, str | None]] = {}
        self._workers: dict[str, tuple[int, list[str]]] = {}  # live key -> (mod_rev, addresses)
        self._rings: dict[int, tuple[int, Ring]] = {}
        # (volume, index) -> the keys that may hold it: `entry` runs several times per write
        # (access point and primary), and formatting the two keys was ~3% of a primary's CPU
        self._keys: dict[tuple[str, int], list[str]] = {}
        # when each live record was first seen missing (monotonic); see `gone_since`
        self._started = time.monotonic()
        self._gone: dict[str, float] = {}
        # called with the id of every chunk server whose live record vanishes
        self.on_gone: list[Callable[[str], None]] = []
        self._live_task: asyncio.Task[None] | None = None

    async def start(self) -> ExtentMap:
        for cache in (self.extents, self.live, self.chunks, self.admin, self.volumes):
            await cache.start()
        self._started = time.monotonic()
        self._live_task = asyncio.create_task(self._follow_live(), name="live chunk records")
        return self

    async def stop(self) -> None:
        if self._live_task is not None:
            self._live_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._live_task
        for cache in (self.extents, self.live, self.chunks, self.admin, self.volumes):
            await cache.stop()

    async def _follow_live(self) -> None:
        seen = set(self.live.items)
        while True:
            async with self.live.changed:
                await self.live.changed.wait()
            now = time.monotonic()
            present = set(self.live.items)
            for key in seen - present:
                chunk_id = key.removeprefix(Keys.LIVE_CHUNKS)
                self._gone.setdefault(chunk_id, now)
                for callback in self.on_gone:
                    callback(chunk_id)
            for key in present:
                self._gone.pop(key.removeprefix(Keys.LIVE_CHUNKS), None)
            seen = present

    def gone_since(self, chunk_id: str) -> float | None:
        """When (time.monotonic) this server's live record was first seen missing: None while
        it is live; our start time if it was already missing then (it vanished earlier)."""
        if self.is_live(chunk_id):
            return None
        return self._gone.get(chunk_id, self._started)

    # -- look-ups (cached) ---------------------------------------------------------------------

    def _entries(self, kv: KeyValue) -> dict[tuple[str, int], Entry]:
        cached = self._decoded.get(kv.key)
        if cached is not None and cached[0] == kv.mod_revision:
            return cached[1]
        found = {
            (rec.volume, rec.index): Entry(rec, stamp)
            for rec, stamp in decode_kv(kv.key, kv.value, kv.mod_revision)
        }
        self._decoded[kv.key] = (kv.mod_revision, found)
        return found

    def entry(self, volume: str, index: int) -> Entry | None:
        keys = self._keys.get((volume, index))
        if keys is None:
            if len(self._keys) >= KEYS_MEMO:
                self._keys.clear()
            keys = self._keys[(volume, index)] = extent_keys(volume, index)
        for key in keys:
            kv = self.extents.get(key)
            if kv is None:
                self._decoded.pop(key, None)
                continue
            found = self._entries(kv).get((volume, index))
            if found is not None:
                return found
        return None

    def ids(self) -> list[tuple[str, int]]:
        """(store volume, index) of every extent loaded: of every volume this server holds
        an extent of (its snapshots' preserved copies with it), and of the volumes in use by
        IO here (pagewatch.py)."""
        if self._ids[0] != self.extents.version:
            items = self.extents.items
            for key in [k for k in self._decoded if k not in items]:
                del self._decoded[key]
            ids = [i for kv in items.values() if kv.value != MOVED for i in self._entries(kv)]
            self._ids = (self.extents.version, ids)
        return self._ids[1]

    def newest_change(self) -> int:
        """The mod_revision of the newest extent-map key we hold: a map whose `revision` is
        at least this has seen every change we have (read leases, docs/datapath.md; with
        partial maps, see docs/scale.md "What a chunk server watches" for what is open)."""
        if self._newest[0] != self.extents.version:
            newest = max((kv.mod_revision for kv in self.extents.items.values()), default=0)
            self._newest = (self.extents.version, newest)
        return self._newest[1]

    def loaded(self, volume: str) -> bool:
        """Whether the volume's extents are followed here: if not, a look-up's None means
        unknown (this server is a member of none of them and no IO here uses it)."""
        return self.extents.loaded(volume)

    @property
    def version(self) -> int:
        """Changes whenever what the look-ups answer may have changed."""
        return self.extents.version

    def serving(self, volume: str) -> contextlib.AbstractAsyncContextManager[None]:
        """`async with emap.serving(volume):` its extents (and its snapshots') are loaded and
        followed until some time after the last such block ends."""
        return self.extents.serving(volume)

    def get(self, volume: str, index: int) -> ExtentRecord | None:
        e = self.entry(volume, index)
        return e.record if e is not None else None

    def volume(self, volume: str) -> VolumeRecord | None:
        """The volume's record as watched; None for a deleted volume or a store name that is
        not a volume (a snapshot's preserved copy)."""
        kv = self.volumes.get(Keys.volume(volume))
        if kv is None:
            self._volumes.pop(volume, None)
            return None
        cached = self._volumes.get(volume)
        if cached is not None and cached[0] == kv.mod_revision:
            return cached[1]
        try:
            record = VolumeRecord.from_json(kv.value)
        except RecordError:
            return None
        self._volumes[volume] = (kv.mod_revision, record)
        return record

    async def volume_now(self, volume: str) -> VolumeRecord | None:
        """The volume's record, read from etcd when our watch has not delivered it yet: the
        first write of a new volume can arrive before its record does, and an extent placed
        without it would ignore the volume's zones and snapshot epoch."""
        known = self.volume(volume)
        if known is not None:
            return known
        kv = await self.etcd.get(Keys.volume(volume))
        if kv is None:
            return None
        try:
            return VolumeRecord.from_json(kv.value)
        except RecordError:
            return None

    def is_live(self, chunk_id: str) -> bool:
        return self.live.get(Keys.live_chunk(chunk_id)) is not None

    def data_address(self, chunk_id: str) -> str | None:
        kv = self.live.get(Keys.live_chunk(chunk_id)) or self.chunks.get(Keys.chunk(chunk_id))
        if kv is None:
            return None
        known = self._addresses.get(kv.key)
        if known is not None and known[0] == kv.mod_revision:
            return known[1]
        try:
            address = ChunkServerInfo.from_json(kv.value).data_address or None
        except RecordError:
            address = None
        self._addresses[kv.key] = (kv.mod_revision, address)
        return address

    def data_addresses(self, chunk_id: str) -> list[str]:
        """Every worker's data address of a live server, by worker index (chunk/workers.py):
        one address for a server of one worker, or one whose live record is gone."""
        kv = self.live.get(Keys.live_chunk(chunk_id))
        if kv is not None:
            # memoised by revision, "no worker list" too: every forward asks (the primary's
            # hot path), and a server of one worker has none (parsing its record per call
            # was ~9% of a primary's CPU under 4 KiB writes)
            known = self._workers.get(kv.key)
            if known is None or known[0] != kv.mod_revision:
                try:
                    workers = ChunkServerStatus.from_json(kv.value).data_workers
                except RecordError:
                    workers = []
                if not all(isinstance(w, str) and w for w in workers):
                    workers = []
                known = self._workers[kv.key] = (kv.mod_revision, workers)
            if known[1]:
                return known[1]
        address = self.data_address(chunk_id)
        return [address] if address is not None else []

    def draining(self, chunk_id: str) -> bool:
        """The operator asked to drain it (`/v1/chunk-admin/<id>`): it takes no new extents."""
        return self.admin.get(Keys.chunk_admin(chunk_id)) is not None

    def live_servers(self) -> list[Server]:
        out = []
        for kv in self.live.items.values():
            try:
                st = ChunkServerStatus.from_json(kv.value)
            except RecordError:
                continue
            if st.id and st.state == "up":
                out.append(Server(st.id, st.zone or "default", st.capacity, st.free))
        return out

    async def wait_newer(self, volume: str, index: int, gen: int, timeout: float) -> bool:
        """Wait until the cached entry's gen is at least `gen` (our watch lags etcd)."""
        try:
            await self.extents.wait_for(
                lambda _: (r := self.get(volume, index)) is not None and r.gen >= gen, timeout
            )
        except TimeoutError:
            return False
        return True

    async def entry_now(self, volume: str, index: int) -> Entry | None:
        """The extent's entry; when our watch has none, etcd's. An access point must not take
        "not in our map" for "never written": another access point may have allocated the
        extent, and had writes to it acknowledged, before our watch delivers that (a read
        would answer zeros for acknowledged data, an unmap skip it)."""
        cached = self.entry(volume, index)  # every access write asks: no etcd, no dict then
        if cached is not None:
            return cached
        return (await self.entries_now(volume, (index,)))[index]

    async def entries_now(self, volume: str, indexes: Sequence[int]) -> dict[int, Entry | None]:
        """`entry_now` of several extents, with one etcd read for all that our map lacks."""
        found = {index: self.entry(volume, index) for index in indexes}
        missing = [index for index, entry in found.items() if entry is None]
        if missing:
            keys = {key for index in missing for key in extent_keys(volume, index)}
            read = await read_keys(self.etcd, keys)
            for index in missing:
                found[index] = _entry_in(read, index)
        return found

    async def fresh(self, volume: str, index: int) -> Entry | None:
        """The entry as etcd has it now (bypassing the watch), and the cache caught up to it."""
        read = await read_keys(self.etcd, extent_keys(volume, index))
        # (the read's own revision may be of keys elsewhere, which the cache never sees)
        for key, kv in read[0].items():
            if kv is not None:
                await self.extents.wait_for_key(key, kv.mod_revision, timeout=10)
        return _entry_in(read, index)

    # -- changes -------------------------------------------------------------------------------

    async def allocate(
        self,
        volume: str,
        index: int,
        replicas: int,
        *,
        on: list[str] | None = None,
        origin: str = "",
    ) -> Entry:
        """The extent's entry, creating it (gen 1, replicas from the ring) if absent.

        A clone's extent is placed `on` the servers of its `origin` (docs/snapshots.md); its
        epoch is the volume's current snapshot epoch."""
        existing = self.entry(volume, index)
        if existing is not None:
            return existing
        vol = await self.volume_now(volume)
        if on is not None:
            members = [c for c in on if self.is_live(c)]
            placed = on
        else:
            ring = await self.ring(replicas)
            placed = ring.place(volume, index)
            if vol is not None and vol.zones:  # CSI topology: only servers of those zones
                zone_of = {s.id: s.zone for s in self.live_servers()}
                placed = restrict_to_zones(placed, zone_of, vol.zones, replicas, volume, index)
            # A ring may still name a server that is down (no planner rebuilt it yet): leave
            # it out rather than give the extent a replica that can never be written.
            members = [c for c in placed if self.is_live(c) and not self.draining(c)]
        if not members:  # everything placed is draining: better there than nowhere
            members = [c for c in placed if self.is_live(c)]
        if not members:
            raise AllocationError(f"no live chunk server among {placed}")
        record = ExtentRecord(
            volume=volume,
            index=index,
            gen=1,
            replicas=members,
            epoch=vol.epoch if vol is not None else 0,
            origin=origin,
            copies=replicas,
        )
        done = await self.transact([Change(volume, index, None, record)])
        if done is not None and done[0] is not None:
            return done[0]
        entry = await self.fresh(volume, index)
        if entry is None:  # deleted at once by someone else: unusual, let the caller retry
            raise AllocationError(f"extent {volume}/{index} vanished after allocation")
        return entry

    async def replace(self, old: Entry, new: ExtentRecord) -> Entry | None:
        """Commit `new` if the entry is still `old`; the new entry, or None if we lost."""
        done = await self.transact([Change(new.volume, new.index, old.mod_revision, new)])
        return done[0] if done is not None else None

    async def transact(self, changes: list[Change]) -> list[Entry | None] | None:
        """Apply `changes` in one transaction (common/extent_pages.py): each extent's new
        entry (None where deleted), or None if one was not what its change expects."""
        keys = {k for ch in changes for k in extent_keys(ch.volume, ch.index)}
        # keys of families not loaded are read by `commit` (absent here is not absent there)
        view = {k: self.extents.get(k) for k in keys if self.extents.covers(k)}
        done = await commit(self.etcd, changes, view=view, base=self.extents.revision)
        if done is None:
            return None
        for ch in changes:
            await self.extents.wait_for_key(page_key(ch.volume, ch.index), done.revision, 10)
        return [Entry(r, done.stamp) if r is not None else None for r in done.stored]

    async def ring(self, replicas: int) -> Ring:
        """The stored ring for this replica count; the first caller builds and stores one."""
        key = Keys.ring(replicas)
        kv = await self.etcd.get(key)
        if kv is None:
            try:
                proposal = bootstrap_ring(self.live_servers(), replicas)
            except RingError as exc:
                raise AllocationError(str(exc)) from None
            await self.etcd.create(key, json.dumps(proposal.to_dict()).encode())
            kv = await self.etcd.get(key)
            if kv is None:
                raise AllocationError(f"ring {key} vanished")
        cached = self._rings.get(replicas)
        if cached is not None and cached[0] == kv.mod_revision:
            return cached[1]
        try:
            ring = Ring.from_dict(json.loads(kv.value))
        except (ValueError, PlacementError) as exc:
            raise AllocationError(f"stored ring {key} is unusable: {exc}") from None
        self._rings[replicas] = (kv.mod_revision, ring)
        return ring


def _entry_in(read: tuple[dict[str, KeyValue | None], int], index: int) -> Entry | None:
    """Extent `index`'s entry in a `read_keys` answer for its keys."""
    for kv in read[0].values():
        for rec, stamp in decode_kv(kv.key, kv.value, kv.mod_revision) if kv else ():
            if rec.index == index:
                return Entry(rec, stamp)
    return None
