"""The extent map as a chunk server sees it: a watched copy of etcd, plus the transactions that
change it (allocation, removing a replica, promoting a new primary). docs/datapath.md.

Every change is one etcd transaction comparing the entry's mod_revision (or its absence), so
two chunk servers racing for the same change cannot both win; the loser re-reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lunastor.chunk.ring import RingError, Server, StoredRing, bootstrap_ring
from lunastor.common.etcd import Compare, Etcd, Put
from lunastor.common.etcd.cache import PrefixCache
from lunastor.common.records import (
    ChunkServerInfo,
    ChunkServerStatus,
    ExtentRecord,
    Keys,
    RecordError,
)


class AllocationError(Exception):
    """No replica set can be chosen now (too few chunk servers up): retry later."""


@dataclass(frozen=True, slots=True)
class Entry:
    record: ExtentRecord
    mod_revision: int


class ExtentMap:
    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self.extents = PrefixCache(etcd, Keys.EXTENTS)
        self.live = PrefixCache(etcd, Keys.LIVE_CHUNKS)
        self.chunks = PrefixCache(etcd, Keys.CHUNKS)
        self._decoded: dict[str, Entry] = {}
        self._rings: dict[int, tuple[int, StoredRing]] = {}

    async def start(self) -> ExtentMap:
        for cache in (self.extents, self.live, self.chunks):
            await cache.start()
        return self

    async def stop(self) -> None:
        for cache in (self.extents, self.live, self.chunks):
            await cache.stop()

    # -- look-ups (cached) ---------------------------------------------------------------------

    def entry(self, volume: str, index: int) -> Entry | None:
        key = Keys.extent(volume, index)
        kv = self.extents.get(key)
        if kv is None:
            self._decoded.pop(key, None)
            return None
        cached = self._decoded.get(key)
        if cached is not None and cached.mod_revision == kv.mod_revision:
            return cached
        try:
            entry = Entry(ExtentRecord.from_json(kv.value), kv.mod_revision)
        except RecordError:
            return None
        self._decoded[key] = entry
        return entry

    def get(self, volume: str, index: int) -> ExtentRecord | None:
        e = self.entry(volume, index)
        return e.record if e is not None else None

    def is_live(self, chunk_id: str) -> bool:
        return self.live.get(Keys.live_chunk(chunk_id)) is not None

    def data_address(self, chunk_id: str) -> str | None:
        kv = self.live.get(Keys.live_chunk(chunk_id)) or self.chunks.get(Keys.chunk(chunk_id))
        if kv is None:
            return None
        try:
            return ChunkServerInfo.from_json(kv.value).data_address or None
        except RecordError:
            return None

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

    async def fresh(self, volume: str, index: int) -> Entry | None:
        """The entry as etcd has it now (bypassing the watch), and the cache caught up to it."""
        kv = await self.etcd.get(Keys.extent(volume, index))
        if kv is None:
            return None
        await self.extents.wait_for_revision(kv.mod_revision, timeout=10)
        return Entry(ExtentRecord.from_json(kv.value), kv.mod_revision)

    # -- changes -------------------------------------------------------------------------------

    async def allocate(self, volume: str, index: int, replicas: int) -> Entry:
        """The extent's entry, creating it (gen 1, replicas from the ring) if absent."""
        existing = self.entry(volume, index)
        if existing is not None:
            return existing
        ring = await self.ring(replicas)
        placed = ring.place(volume, index)
        # A ring may still name a server that is down (no planner rebuilt it yet): leave it
        # out rather than give the extent a replica that can never be written.
        members = [c for c in placed if self.is_live(c)]
        if not members:
            raise AllocationError(f"no live chunk server among {placed}")
        record = ExtentRecord(volume=volume, index=index, gen=1, replicas=members, copies=replicas)
        key = Keys.extent(volume, index)
        res = await self.etcd.txn([Compare.version(key) == 0], [Put(key, record.to_json())])
        if res.succeeded:
            await self.extents.wait_for_revision(res.revision, timeout=10)
        entry = await self.fresh(volume, index)
        if entry is None:  # deleted at once by someone else: unusual, let the caller retry
            raise AllocationError(f"extent {volume}/{index} vanished after allocation")
        return entry

    async def replace(self, old: Entry, new: ExtentRecord) -> Entry | None:
        """Commit `new` if the entry is still `old`; the new entry, or None if we lost."""
        key = Keys.extent(new.volume, new.index)
        res = await self.etcd.txn(
            [Compare.mod_revision(key) == old.mod_revision], [Put(key, new.to_json())]
        )
        if not res.succeeded:
            return None
        await self.extents.wait_for_revision(res.revision, timeout=10)
        return Entry(new, res.revision)

    async def ring(self, replicas: int) -> StoredRing:
        """The stored ring for this replica count; the first caller builds and stores one."""
        key = Keys.ring(replicas)
        kv = await self.etcd.get(key)
        if kv is None:
            try:
                proposal = bootstrap_ring(self.live_servers(), replicas)
            except RingError as exc:
                raise AllocationError(str(exc)) from None
            await self.etcd.create(key, json.dumps(proposal).encode())
            kv = await self.etcd.get(key)
            if kv is None:
                raise AllocationError(f"ring {key} vanished")
        cached = self._rings.get(replicas)
        if cached is not None and cached[0] == kv.mod_revision:
            return cached[1]
        try:
            ring = StoredRing.from_dict(json.loads(kv.value))
        except (ValueError, RingError) as exc:
            raise AllocationError(f"stored ring {key} is unusable: {exc}") from None
        self._rings[replicas] = (kv.mod_revision, ring)
        return ring
