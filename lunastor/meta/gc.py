"""Garbage collection of extents nobody can read any more (docs/snapshots.md, "Space reclaim").

Work is recorded in etcd: deleting a volume puts `/v1/gc/volumes/<id>`, deleting a snapshot
`/v1/gc/snapshots/<id>` (each in the same transaction as the delete). Each pass of the planner
(the meta instance holding the planner lease) looks at the volumes those name and frees every
extent version no live volume or snapshot refers to: one transaction per extent deletes its
map entry (if the extent still carries the stamp read: common/extent_pages.py) and puts a work
item per member, and per former member that may still hold files (`ExtentRecord.strays`), at
`Keys.gc_replica(chunk, store volume, index)`, which that chunk server executes
(`lunastor/chunk/maintenance/collector.py`). A tombstone is removed once its volume has
nothing left.

References are **counted, not stored**: a version is referenced while a pin selects it. A pin
is a (volume, epoch) that some snapshot or clone reads (`pins`); a volume's live extent with
epoch L is selected by pins (V, e >= L) and by V itself while V exists; a preserved copy of
epochs [K, until) by pins (V, K <= e < until). Nothing can be over- or under-counted after a
crash, because nothing is counted ahead: every pass recomputes from the records. Every step
is idempotent, so a planner killed midway simply redoes the remainder on its next pass.
"""

from __future__ import annotations

from collections.abc import Iterable

from lunastor.common.etcd import Delete, Etcd, Get, KeyValue, Put
from lunastor.common.etcd.model import Op
from lunastor.common.extent_pages import MOVED, Change, commit, decode_kv
from lunastor.common.logs import get_logger
from lunastor.common.records import (
    ExtentRecord,
    Keys,
    RecordError,
    SnapshotRecord,
    VolumeRecord,
    parse_preserved,
)

log = get_logger(component="gc")

BATCH = 256  # extent versions freed per pass (`gc_batch`): bounds a pass's time and etcd load
PER_TXN = 8  # extent versions freed per transaction (`txn_groups`)
WORK_PER_TXN = 32  # replica work items per transaction (`txn_groups`)
PROBES = 60  # volumes asked "anything left?" per transaction (2 reads each; etcd allows 128)
DELETES = 100  # tombstones deleted per transaction
# Quiet passes (nothing deleted since everything left was found pinned) between two that read
# every record anyway: 5 minutes at the default interval (see `GcPlanner._settled`).
FULL_PASS_EVERY = 60


def pins(
    snapshots: Iterable[SnapshotRecord], volumes: Iterable[VolumeRecord]
) -> dict[str, set[int]]:
    """Every (volume, epoch) some snapshot or clone may read, as volume -> epochs."""
    out: dict[str, set[int]] = {}
    for snap in snapshots:
        out.setdefault(snap.source_volume_id, set()).add(snap.epoch)
        for link in snap.base:
            out.setdefault(str(link["volume"]), set()).add(int(link["epoch"]))
    for vol in volumes:
        for link in vol.base:
            out.setdefault(str(link["volume"]), set()).add(int(link["epoch"]))
    return out


def referenced(rec: ExtentRecord, alive: set[str], pinned: dict[str, set[int]]) -> bool:
    """Whether anything can still read this extent version."""
    preserved = parse_preserved(rec.volume)
    if preserved is None:
        return rec.volume in alive or any(e >= rec.epoch for e in pinned.get(rec.volume, ()))
    volume, first = preserved
    until = rec.until if rec.until > first else 2**63  # a damaged bound: keep it
    return any(first <= e < until for e in pinned.get(volume, ()))


def unpinning(done: Iterable[str], vol_tombs: Iterable[KeyValue]) -> bool:
    """Whether deleting the records of the tombstones `done` (of volumes with nothing left in
    the extent map) may have freed another volume's extents: a snapshot's tombstone always
    (its pins), a volume's when the volume was a clone (its `base` pins its sources) or its
    record cannot be read."""
    values = {kv.key: kv.value for kv in vol_tombs}
    for key in done:
        if key.startswith(Keys.GC_SNAPSHOTS):
            return True
        try:
            if VolumeRecord.from_json(values[key]).base:
                return True
        except RecordError:
            return True
    return False


def holders(rec: ExtentRecord) -> list[str]:
    """Who may hold files of `rec`: its members and its strays; each gets a work item."""
    return sorted({*rec.replicas, *rec.strays})


def extent_prefixes(volume: str) -> tuple[str, str]:
    """The extent-map prefixes of `volume`: its own extents, and its preserved copies."""
    return Keys.volume_extents(volume), f"{Keys.EXTENTS}{volume}.e"


def txn_groups(doomed: list[tuple[ExtentRecord, int]]) -> list[list[tuple[ExtentRecord, int]]]:
    """`doomed` in order, cut into the groups freed one transaction each: at most PER_TXN
    versions and WORK_PER_TXN work items (one per member and stray), so that a transaction's
    entries, reverse-index shards and work items stay well within etcd's 128 operations."""
    groups: list[list[tuple[ExtentRecord, int]]] = []
    work = 0
    for item in doomed:
        items = len(holders(item[0]))
        if not groups or len(groups[-1]) >= PER_TXN or work + items > WORK_PER_TXN:
            groups.append([])
            work = 0
        groups[-1].append(item)
        work += items
    return groups


class GcPlanner:
    name = "gc"

    def __init__(self, etcd: Etcd, batch: int = BATCH) -> None:
        self.etcd = etcd
        self.batch = batch
        # The tombstones the last pass left, when it found everything left pinned. A pin goes
        # only with the record that holds it, and deleting a volume or a snapshot puts a
        # tombstone: while the tombstones are these, nothing can have become free, and a pass
        # need not read every volume and snapshot record (a million, at scale) to find that
        # out again. A deleted volume whose snapshot is kept stays pinned for as long as the
        # snapshot: without this, every pass read them all. A pass that reads them anyway
        # comes every FULL_PASS_EVERY (a tombstone another planner leader put and removed
        # meanwhile is not seen here; nor is a restored backup).
        self._settled: frozenset[str] | None = None
        self._quiet_passes = 0

    async def run_once(self) -> None:
        await self.collect_once()

    async def collect_once(self) -> int:
        """One pass: the number of extent versions freed."""
        vol_tombs, _ = await self.etcd.get_prefix(Keys.GC_VOLUMES)
        snap_tombs, _ = await self.etcd.get_prefix(Keys.GC_SNAPSHOTS)
        if not vol_tombs and not snap_tombs:
            return 0
        tombstones = frozenset(kv.key for kv in (*vol_tombs, *snap_tombs))
        settled = self._settled if self._quiet_passes < FULL_PASS_EVERY else None
        if tombstones == settled:
            self._quiet_passes += 1
            return 0
        self._settled = None
        subjects: dict[str, list[str]] = {}  # volume -> tombstone keys that name it
        for kv in vol_tombs:
            subjects.setdefault(kv.key.removeprefix(Keys.GC_VOLUMES), []).append(kv.key)
        for kv in snap_tombs:
            try:
                snap = SnapshotRecord.from_json(kv.value)
            except RecordError:
                snap = SnapshotRecord()
            subjects.setdefault(snap.source_volume_id, []).append(kv.key)
        # A volume with nothing left in the extent map (never written, or already freed) needs
        # no pins: its tombstones go at once, many a transaction. Most deleted volumes of a
        # churning cluster (CSI create/delete) are such, and the pins below read every volume
        # and snapshot record: not worth it, at a million volumes, for nothing to free.
        done = [key for v in await self._empty(sorted(subjects)) for key in subjects.pop(v)]
        for i in range(0, len(done), DELETES):
            await self.etcd.txn([], [Delete(key) for key in done[i : i + DELETES]])
        if not subjects:
            return 0
        standing = tombstones.difference(done)  # the empty volumes' gone
        if settled is not None and standing <= settled and not unpinning(done, vol_tombs):
            # CSI churn beside the pinned: the volumes deleted since were never written and
            # no clones, so no pin went with them
            self._settled = standing
            self._quiet_passes += 1
            return 0
        self._quiet_passes = 0
        # Read after the tombstones: every pin that could still be created refers to a
        # version these records already pin, or to a live extent of a volume that exists.
        snap_kvs, _ = await self.etcd.get_prefix(Keys.SNAPSHOTS)
        vol_kvs, _ = await self.etcd.get_prefix(Keys.VOLUMES)
        snaps = [SnapshotRecord.from_json(kv.value) for kv in snap_kvs]
        vols = [VolumeRecord.from_json(kv.value) for kv in vol_kvs]
        alive = {v.id for v in vols}
        pinned = pins(snaps, vols)
        freed = 0
        all_pinned = True  # everything left of every subject is pinned
        gone: set[str] = set()
        for volume, tombs in sorted(subjects.items()):
            remaining, n, pinned_only = await self._collect(
                volume, alive, pinned, self.batch - freed
            )
            freed += n
            all_pinned = all_pinned and pinned_only
            if remaining is None:
                break  # out of budget: the next pass goes on
            for key in tombs:
                # A volume tombstone stays while anything of the volume is left (pinned);
                # a snapshot tombstone is done once its volume was looked at in full.
                if key.startswith(Keys.GC_SNAPSHOTS) or not remaining:
                    await self.etcd.delete(key)
                    gone.add(key)
        if all_pinned:
            self._settled = standing - gone
        if freed:
            log.info("extent versions freed", count=freed)
        return freed

    async def _empty(self, volumes: list[str]) -> list[str]:
        """The volumes of `volumes` with no key left in the extent map, own or preserved
        (`""`, the subject of an unreadable snapshot tombstone, has none)."""
        empty: list[str] = []
        for i in range(0, len(volumes), PROBES):
            batch = volumes[i : i + PROBES]
            probes: list[Op] = [
                Get(prefix, prefix=True, limit=1)
                for v in batch
                for prefix in extent_prefixes(v)
                if v
            ]
            found = iter((await self.etcd.txn([], probes)).responses)
            for v in batch:
                if not v or not any([next(found), next(found)]):
                    empty.append(v)
        return empty

    async def _collect(
        self, volume: str, alive: set[str], pinned: dict[str, set[int]], budget: int
    ) -> tuple[int | None, int, bool]:
        """Free `volume`'s unreferenced versions: (versions left, or None when the budget ran
        out first; versions freed; whether it found none to free)."""
        kvs = []
        if volume:
            for prefix in extent_prefixes(volume):
                kvs += (await self.etcd.get_prefix(prefix))[0]
        left = 0
        doomed: list[tuple[ExtentRecord, int]] = []  # unreferenced, within the budget
        over_budget = False
        for kv in kvs:
            entries = decode_kv(kv.key, kv.value, kv.mod_revision)
            if not entries and kv.value != MOVED:
                left += 1  # undecodable: kept, and so is the tombstone
            for rec, stamp in entries:
                if referenced(rec, alive, pinned):
                    left += 1
                elif len(doomed) < budget:
                    doomed.append((rec, stamp))
                else:
                    over_budget = True
        freed = 0
        for group in txn_groups(doomed):
            if await self._free(group):
                freed += len(group)
            elif len(group) > 1:  # one changed meanwhile: free the others one by one
                for one in group:
                    freed += int(await self._free([one]))
        # what changed meanwhile is left, and looked at again next pass
        remaining = None if over_budget else left + len(doomed) - freed
        return remaining, freed, not doomed and not over_budget

    async def _free(self, doomed: list[tuple[ExtentRecord, int]]) -> bool:
        """Delete the map entries of `doomed` (each only if it still carries the stamp read)
        and put the replica work items of their members and strays, in one transaction."""
        changes = [Change(rec.volume, rec.index, stamp, None) for rec, stamp in doomed]
        work = [
            Put(Keys.gc_replica(m, rec.volume, rec.index), b"")
            for rec, _ in doomed
            for m in holders(rec)
        ]
        return await commit(self.etcd, changes, extra=work) is not None
