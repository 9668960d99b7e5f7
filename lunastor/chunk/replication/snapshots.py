"""Snapshots and clones on the data path (docs/snapshots.md).

A volume has a snapshot **epoch**; a snapshot freezes the current one and bumps the volume's.
Every extent map entry carries the epoch its data was written in. The first write (or unmap)
to an extent whose epoch is older than its volume's copies it aside first, chunk-locally on
every replica, as a **preserved copy**: extent `i` of the store volume `<volume>.e<epoch>`,
holding the data of epochs `[epoch, until)`. Several snapshots without writes between them
resolve to the same copy. Reading a volume "as of epoch e" takes, per extent, the live extent
if its epoch is <= e, else the preserved copy with the greatest epoch <= e, else (the extent
did not exist then) the next link of the volume's base chain (a clone's source).

This module holds the lookups (pure over the watched extent map) and the two chunk-local
steps: preserving at the primary and creating a clone's extent from its origin. It does not
import the data node; the node calls it under the extent's lock.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Protocol

from prometheus_client import Counter

from lunastor.chunk.replication.extentmap import Entry, ExtentMap
from lunastor.chunk.wire.messages import Clone, GetState, Request, Response, Status
from lunastor.chunk.wire.peer import PeerError
from lunastor.common.extent_pages import ANY, Change
from lunastor.common.records import (
    ExtentRecord,
    VolumeRecord,
    parse_preserved,
    preserved_volume,
)

log = logging.getLogger(__name__)

PRESERVED = Counter(
    "lunastor_extents_preserved_total", "Extents copied aside for a snapshot before a write"
)
CLONED = Counter("lunastor_clone_extents_total", "Clone extents created from their origin")

Call = Callable[[str, Callable[[int], Request]], Awaitable[Response]]


class PreserveFailed(Exception):
    """The copy could not be made or committed now; the write is refused and retried."""


class VersionIndex:
    """Preserved copies per (volume, extent index), from the watched extent map.

    Rebuilt from the map's extent ids whenever its revision moved: O(extents) per change,
    cheap next to the etcd round trip that caused the change.
    """

    def __init__(self, emap: ExtentMap) -> None:
        self.emap = emap
        self._revision = -1
        self._epochs: dict[tuple[str, int], list[int]] = {}

    def preserved(self, volume: str, index: int) -> list[int]:
        if self.emap.version != self._revision:
            epochs: dict[tuple[str, int], list[int]] = {}
            for name, idx in self.emap.ids():
                parsed = parse_preserved(name)
                if parsed is not None:
                    epochs.setdefault((parsed[0], idx), []).append(parsed[1])
            for found in epochs.values():
                found.sort()
            self._epochs, self._revision = epochs, self.emap.version
        return self._epochs.get((volume, index), [])

    def version_at(self, volume: str, epoch: int, index: int) -> Entry | None:
        """Extent `index` of `volume` as it was at the end of `epoch`; None if it had none."""
        live = self.emap.entry(volume, index)
        if live is not None and live.record.epoch <= epoch:
            return live
        return pick_preserved(self.preserved(volume, index), epoch, self._entry(volume, index))

    def _entry(self, volume: str, index: int) -> Callable[[int], Entry | None]:
        return lambda k: self.emap.entry(preserved_volume(volume, k), index)

    def source(self, base: Sequence[dict[str, Any]], index: int) -> Entry | None:
        """Where a volume with this base chain reads extent `index` it never wrote."""
        for link in base:
            found = self.version_at(str(link["volume"]), int(link["epoch"]), index)
            if found is not None:
                return found
        return None


def pick_preserved(
    epochs: Sequence[int], epoch: int, entry: Callable[[int], Entry | None]
) -> Entry | None:
    """The preserved copy with the greatest epoch <= `epoch` (`epochs` sorted)."""
    at = bisect.bisect_right(epochs, epoch)
    return entry(epochs[at - 1]) if at else None


class PrimaryState(Protocol):
    """What preserving needs of the primary's per-extent state (dataserver.PrimaryExtent)."""

    volume: str
    index: int
    gen: int
    members: list[str]
    next_seq: int
    idle: asyncio.Event


def due(
    emap: ExtentMap, pe: PrimaryState, entry: Entry | None = None
) -> tuple[Entry, VolumeRecord] | None:
    """The extent's entry and volume if its data predates the volume's newest snapshot (a
    copy is due before the next mutation), else None; without waiting (the primary's write
    fast path asks before every write, with the `entry` it just looked up)."""
    entry = entry or emap.entry(pe.volume, pe.index)
    volume = emap.volume(pe.volume)
    if entry is None or volume is None or entry.record.epoch >= volume.epoch:
        return None
    return entry, volume


async def preserve(emap: ExtentMap, call: Call, pe: PrimaryState) -> bool:
    """Copy the extent aside if its data predates the volume's newest snapshot.

    Called by the primary holding the extent's lock, before it applies a write or unmap.
    Every forward has settled first, so each member that is at the primary's applied seq
    holds exactly the primary's data; those members copy their own replica locally
    (`clone`), then one transaction records the copy and moves the live extent to the
    volume's epoch. Returns True if it preserved; raises PreserveFailed to refuse the write.
    """
    found = due(emap, pe)
    if found is None:
        return False  # no snapshot since the data was written, or not a volume's extent
    entry, volume = found
    rec = entry.record
    if rec.gen != pe.gen:
        raise PreserveFailed(f"the map is at gen {rec.gen}, the primary at {pe.gen}")
    await pe.idle.wait()
    name = preserved_volume(pe.volume, rec.epoch)
    applied = pe.next_seq - 1

    async def copy(member: str) -> bool:
        try:
            if member != pe.members[0]:
                st = await call(member, partial(GetState, volume=pe.volume, extent=pe.index))
                if not st.ok or st.fields["gen"] != pe.gen or st.fields["state"] != 0:
                    return False
                if st.fields["applied_seq"] != applied:
                    return False  # it missed a write: its copy would differ (it is removed)
            resp = await call(
                member, partial(Clone, volume=pe.volume, extent=pe.index, dst=name, gen=1)
            )
        except PeerError as exc:
            log.warning("preserving %s/%d on %s: %s", pe.volume, pe.index, member, exc)
            return False
        if not resp.ok:
            log.warning("preserving %s/%d on %s: %s", pe.volume, pe.index, member, resp.status)
        return resp.ok

    done = await asyncio.gather(*(copy(m) for m in pe.members))
    holders = [m for m, ok in zip(pe.members, done, strict=True) if ok]
    if not done[0]:
        raise PreserveFailed(f"the primary could not copy {pe.volume}/{pe.index}")
    kept = ExtentRecord(
        volume=name,
        index=pe.index,
        gen=1,
        replicas=holders,
        epoch=rec.epoch,
        until=volume.epoch,
        strays=[m for m in pe.members if m not in holders],  # a copy may have begun there
    )
    moved = dataclasses.replace(rec, epoch=volume.epoch)
    committed = await emap.transact(
        [
            Change(name, pe.index, ANY, kept),
            Change(pe.volume, pe.index, entry.mod_revision, moved),
        ]
    )
    if committed is None:
        raise PreserveFailed(f"extent {pe.volume}/{pe.index} changed while preserving it")
    PRESERVED.inc()
    log.info(
        "extent %s/%d: epoch %d preserved as %s on %s",
        pe.volume,
        pe.index,
        rec.epoch,
        name,
        holders,
    )
    return True


async def clone_from_origin(call: Call, member: str, rec: ExtentRecord) -> bool:
    """Create `member`'s replica of a clone's extent as a local copy of its origin, unless it
    has one already. False if it cannot (it is then removed from the extent)."""
    try:
        st = await call(member, partial(GetState, volume=rec.volume, extent=rec.index))
        if st.ok:
            return True
        if st.status is not Status.NOT_FOUND:
            return False
        resp = await call(
            member,
            partial(Clone, volume=rec.origin, extent=rec.index, dst=rec.volume, gen=rec.gen),
        )
    except PeerError as exc:
        log.warning("cloning %s/%d on %s: %s", rec.volume, rec.index, member, exc)
        return False
    if resp.ok:
        CLONED.inc()
    return resp.ok
