"""The access point's side of the data path: `ReplicatedVolume` (a `BlockDevice` over the
extents of one volume) and `AccessPath` (routing each extent piece to its primary, retrying
across generation changes, and replacing a failed primary). docs/datapath.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from prometheus_client import Counter

from lunastor.chunk.access.allocation import AllocationMap, AllocationMaps
from lunastor.chunk.access.completion import Completion
from lunastor.chunk.access.local_read import LocalReads
from lunastor.chunk.access.nexus_epochs import NexusEpochs
from lunastor.chunk.maintenance.locality import Activity
from lunastor.chunk.replication.extentmap import AllocationError, Entry, ExtentMap
from lunastor.chunk.replication.node import DataNode, Replicas, first_difference
from lunastor.chunk.replication.snapshots import VersionIndex
from lunastor.chunk.store import BLOCK_SIZE, CHECKSUM_SIZE, ExtentStoreError, ReplicaState
from lunastor.chunk.wire.messages import (
    CompareAndWrite,
    Copy,
    Flush,
    GetState,
    Nexus,
    Preserve,
    Read,
    Request,
    Response,
    SetGen,
    Status,
    Unmap,
    Write,
)
from lunastor.chunk.wire.peer import PeerError
from lunastor.chunk.workers import owner
from lunastor.common.events import EVENTS
from lunastor.common.logs import get_logger
from lunastor.common.records import ExtentRecord, VolumeRecord, parse_preserved
from lunastor.common.volume_io import VolumeIo
from lunastor.iscsi.blockdev import (
    LbaState,
    LbaStatus,
    MediumError,
    Miscompare,
    NexusLost,
    NotReady,
    OutOfRange,
    SpaceExhausted,
)
from lunastor.iscsi.scsi.types import Nexus as ScsiNexus

log = logging.getLogger(__name__)
slog = get_logger(component="access-path")  # structured: key=value fields

CHECKSUM_REPAIRS = Counter(
    "lunastor_checksum_repairs_total",
    "Blocks that failed their checksum on a replica and were rewritten from another replica",
)
FAILOVERS = Counter("lunastor_primary_failovers_total", "Extents given a new primary")
SEQUENCED = Counter(
    "lunastor_writes_sequenced",
    "Writes an access point had sequenced (acknowledged by the extent's primary)",
)
SEQUENCED_LOCAL = Counter(
    "lunastor_writes_sequenced_local",
    "Writes an access point had sequenced by the primary in its own process (locality)",
)

COPY_CHUNK = 1 << 20  # bytes per COPY while converging replicas
LBA_STATUS_RUNS = 16  # runs one GET LBA STATUS answers at most (qemu asks for one)
LBA_STATUS_EXTENTS = 64  # extents one GET LBA STATUS walks at most
# Write data at least this long is passed on as a view of the iSCSI buffer it arrived in, not
# copied: that buffer (the connection's receive buffer, or a pooled Data-Out buffer) is not
# reused while a view of it is alive (`lunastor.iscsi.buffers`). A shorter write is copied:
# a few KiB cost less to copy than the fresh 1 MiB receive buffer a pinned one would force.
VIEW_WRITES_FROM = 64 << 10


class PrimaryRefused(MediumError):
    """The primary answered `bad_request`: a request it cannot parse, such as an op its
    (older) version does not know (a `caw` during a rolling upgrade)."""


@dataclass(frozen=True, slots=True)
class Piece:
    extent: int
    offset: int  # byte offset within the extent
    length: int
    start: int  # byte offset within the request's buffer


def split(offset: int, length: int, extent_size: int) -> list[Piece]:
    """A byte range of the volume as pieces that each lie within one extent."""
    out = []
    pos = offset
    end = offset + length
    while pos < end:
        ext, off = divmod(pos, extent_size)
        n = min(end - pos, extent_size - off)
        out.append(Piece(ext, off, n, pos - offset))
        pos += n
    return out


def _bind_gen(build: Callable[[int, int], Request], gen: int, rid: int) -> Request:
    return build(rid, gen)


def _read_blocks(rec: ExtentRecord, offset: int, size: int) -> Callable[[int], Request]:
    return partial(
        Read,
        volume=rec.volume,
        extent=rec.index,
        gen=rec.gen,
        offset=offset,
        length=size,
        with_checksums=True,
    )


def _copy_blocks(
    rec: ExtentRecord, offset: int, data: bytes, sums: bytes, if_applied: int | None = None
) -> Callable[[int], Request]:
    return partial(
        Copy,
        volume=rec.volume,
        extent=rec.index,
        gen=rec.gen,
        offset=offset,
        length=len(data),
        data=data,
        checksums=sums,
        if_applied=if_applied,
    )


class AccessPath:
    """Routes extent IO: writes to the primary, reads local-first; retries and failover."""

    def __init__(
        self,
        emap: ExtentMap,
        replicas: Replicas,
        node_id: str,
        *,
        lease_ttl: float,
        read_lease: float = 0.0,
        io_timeout: float = 60.0,
        epochs: NexusEpochs | None = None,
        expected_back: Callable[[str], float] | None = None,
    ) -> None:
        """`expected_back(chunk)`: until when (monotonic) a chunk server that is away on
        purpose is expected back, 0.0 if it is not (maintenance/restart.py)."""
        self.emap = emap
        self.expected_back = expected_back
        self.replicas = replicas
        self.node_id = node_id
        self.lease_ttl = lease_ttl
        self.read_lease = read_lease
        self.io_timeout = io_timeout
        # None: writes carry no nexus epoch (fencing off, docs/datapath.md "Fencing")
        self.epochs = epochs
        self._failing_over: dict[tuple[str, int], asyncio.Lock] = {}
        # extents seen converging under another converger: (mod_revision, since when)
        self._converging_since: dict[tuple[str, int], tuple[int, float]] = {}
        # how long a converging extent is left to the one who committed it (`converge`)
        self.converge_grace = 2 * lease_ttl
        self.versions = VersionIndex(emap)
        self._frozen: set[tuple[str, int]] = set()  # live extents of deleted clone sources
        self.local_reads = LocalReads(emap, replicas, node_id)  # the local fast path
        self.activity = Activity()  # IO per extent here: locality claims (locality.py)
        self.allocations = AllocationMaps()  # GET LBA STATUS
        # COMPARE AND WRITE as a `caw` at the extent's primary; False: read, compare and
        # write under a lock of this access point only, as before `caw` existed (not atomic
        # across access points: the negative control of tests/integration/chunk/test_caw.py)
        self.caw_at_primary = True

    async def call(self, chunk_id: str, build: Callable[[int], Request]) -> Response:
        return await self.replicas.call(chunk_id, build)

    async def nexus_epoch(self, nexus: ScsiNexus | None) -> Nexus | None:
        """What a write of `nexus` carries to the primary (waits once for its login)."""
        if nexus is None or self.epochs is None:
            return None
        return await self.epochs.epoch(nexus, self.io_timeout)

    # -- ordered mutations at the primary --------------------------------------------------

    def _serving(
        self, volume: str, base: Sequence[dict[str, Any]]
    ) -> contextlib.AbstractAsyncContextManager[Any]:
        """The extent map of `volume` and of its clone sources loaded while IO runs: a server
        watches only its own extents and those of volumes in use here (pagewatch.py)."""
        if not base:
            return self.emap.serving(volume)
        return self._serving_all([volume, *(str(link["volume"]) for link in base)])

    @contextlib.asynccontextmanager
    async def _serving_all(self, volumes: list[str]) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for name in volumes:
                await stack.enter_async_context(self.emap.serving(name))
            yield

    async def mutate(
        self,
        volume: str,
        index: int,
        replicas: int,
        build: Callable[[int, int], Request],
        *,
        allocate: bool,
        base: Sequence[dict[str, Any]] = (),
        sequenced: bool = False,
    ) -> bool:
        """Run `build(id, gen)` at the extent's primary until it is acknowledged.

        Returns False (nothing done) for an unallocated extent when `allocate` is False and
        the volume does not read that extent from a clone source (`base`)."""
        async with self._serving(volume, base):
            return await self._mutate(
                volume, index, replicas, build, allocate=allocate, base=base, sequenced=sequenced
            )

    async def _mutate(
        self,
        volume: str,
        index: int,
        replicas: int,
        build: Callable[[int, int], Request],
        *,
        allocate: bool,
        base: Sequence[dict[str, Any]],
        sequenced: bool,
    ) -> bool:
        deadline = time.monotonic() + self.io_timeout
        delay = 0.05
        while True:
            if time.monotonic() > deadline:
                raise NotReady(f"extent {volume}/{index}: no primary acknowledged in time")
            entry = await self.emap.entry_now(volume, index)
            if entry is None:
                origin = await self.source(base, index) if base else None
                if not allocate and origin is None:
                    return False
                try:
                    if origin is None:
                        entry = await self.emap.allocate(volume, index, replicas)
                    else:  # a clone's first write: a local copy on the origin's servers
                        entry = await self.emap.allocate(
                            volume,
                            index,
                            replicas,
                            on=list(origin.record.replicas),
                            origin=origin.record.volume,
                        )
                except AllocationError as exc:
                    log.warning("allocation of %s/%d failed: %s", volume, index, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
            rec = entry.record
            if rec.converging:
                await self.converge(entry)
                await self._changed(entry, delay)  # converged, by us or its committer
                delay = min(delay * 2, 1.0)
                continue
            if not self.emap.is_live(rec.primary):
                # gone from etcd: it acknowledges nothing any more, and calling it may only
                # wait for a connect timeout (a cut link); take over at once
                await self.failover(entry)
                now = self.emap.entry(volume, index)
                if now is not None and now.mod_revision == entry.mod_revision:
                    await asyncio.sleep(delay)  # no survivor could take it (yet)
                    delay = min(delay * 2, 1.0)
                continue
            gen = rec.gen
            try:
                resp = await self.call(rec.primary, partial(_bind_gen, build, gen))
            except PeerError as exc:
                log.warning("primary %s of %s/%d: %s", rec.primary, volume, index, exc)
                await self.failover(entry)
                continue
            if resp.ok:
                if sequenced:  # a write (`lunastor_writes_sequenced_*`, bench/locality.py)
                    SEQUENCED.inc()
                    if rec.primary == self.node_id:
                        SEQUENCED_LOCAL.inc()
                return True
            if resp.status is Status.STALE_GENERATION:
                await self.emap.wait_newer(volume, index, max(resp.fields["gen"], gen + 1), 1.0)
                continue
            if resp.status is Status.NO_SPACE:
                raise SpaceExhausted(str(resp.fields.get("message", "")))
            if resp.status is Status.FENCED:
                # A newer login of the nexus exists: this session is superseded, and its
                # write must never be applied (nor retried) anywhere.
                raise NexusLost(f"extent {volume}/{index}: {resp.fields.get('message')}")
            if resp.status in (Status.UNAVAILABLE, Status.NOT_FOUND, Status.NOT_CURRENT):
                log.info(
                    "primary %s of %s/%d: %s %s",
                    rec.primary,
                    volume,
                    index,
                    resp.status,
                    resp.fields.get("message"),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                if not self.emap.is_live(rec.primary):
                    await self.failover(entry)
                continue
            if resp.status is Status.MISCOMPARE:
                raise Miscompare(resp.fields["offset"])  # offset within the piece's verify data
            # Every answer below fails the command with MEDIUM ERROR, which an initiator
            # without retries (libiscsi, VMware) reports to its application: say which.
            slog.warning(
                "primary's answer fails the command",
                primary=rec.primary,
                volume=volume,
                extent=index,
                gen=gen,
                op=str(build(0, gen).OP),
                status=str(resp.status),
                reason=resp.fields.get("message"),
            )
            if resp.status is Status.CHECKSUM_MISMATCH:
                raise MediumError(f"primary {rec.primary}: {resp.fields.get('message')}")
            if resp.status is Status.BAD_REQUEST:
                why = resp.fields.get("message")
                raise PrimaryRefused(f"primary {rec.primary} refused: {why}", write=True)
            raise MediumError(f"primary {rec.primary} answered {resp.status}", write=True)

    async def _changed(self, entry: Entry, timeout: float) -> None:
        """Wait up to `timeout` for the cached entry to differ from `entry`."""
        rec = entry.record

        def moved(_: object) -> bool:
            now = self.emap.entry(rec.volume, rec.index)
            return now is None or now.mod_revision != entry.mod_revision

        with contextlib.suppress(TimeoutError):
            await self.emap.extents.wait_for(moved, timeout)

    # -- clones and snapshots (docs/snapshots.md) -------------------------------------------

    async def source(self, base: Sequence[dict[str, Any]], index: int) -> Entry | None:
        """The extent a volume with clone source chain `base` reads for an extent index it
        never wrote, None if there is none (zeros). Always a version nobody writes any more:
        a live extent of a source volume is first preserved by its primary (a snapshot froze
        it), so the source volume's own writes cannot change what the clone sees."""
        async with self._serving(str(base[0]["volume"]), base[1:]):
            return await self._source(base, index)

    async def _source(self, base: Sequence[dict[str, Any]], index: int) -> Entry | None:
        found = self.versions.source(base, index)
        if found is None or parse_preserved(found.record.volume) is not None:
            return found
        rec = found.record
        if (rec.volume, rec.index) in self._frozen:
            return found

        def build(i: int, gen: int) -> Request:
            return Preserve(i, rec.volume, rec.index, gen)

        await self.mutate(rec.volume, rec.index, len(rec.replicas), build, allocate=False)
        await self.emap.fresh(rec.volume, rec.index)  # our watch shows the preserved copy
        again = self.versions.source(base, index)
        if again is not None and again.record.volume == rec.volume:
            # The primary preserved nothing: the source volume is deleted, so its extents
            # are frozen as they are; no need to ask again.
            if len(self._frozen) >= 100_000:
                self._frozen.clear()
            self._frozen.add((rec.volume, rec.index))
        return again

    # -- reads -------------------------------------------------------------------------------

    async def read(
        self,
        volume: str,
        index: int,
        offset: int,
        length: int,
        base: Sequence[dict[str, Any]] = (),
    ) -> bytes:
        async with self._serving(volume, base):
            return await self._read(volume, index, offset, length, base)

    async def _read(
        self,
        volume: str,
        index: int,
        offset: int,
        length: int,
        base: Sequence[dict[str, Any]],
    ) -> bytes:
        deadline = time.monotonic() + self.io_timeout
        while True:
            if time.monotonic() > deadline:
                raise NotReady(f"extent {volume}/{index}: no replica could be read in time")
            entry = await self.emap.entry_now(volume, index)
            if entry is None and base:
                origin = await self.source(base, index)
                if origin is not None:
                    # nothing of ours yet: read what the clone's source holds
                    volume, entry, base = origin.record.volume, origin, ()
            if entry is None:
                return bytes(length)
            rec = entry.record
            # local first, then the primary, then the other members: all hold every
            # acknowledged write of this generation
            order = [rec.primary] if rec.converging else list(rec.replicas)
            if not rec.converging and self.node_id in order:
                order.remove(self.node_id)
                order.insert(0, self.node_id)
            bad: dict[str, list[int]] = {}
            absent = 0
            for member in order:
                try:
                    resp = await self.call(
                        member,
                        partial(
                            Read,
                            volume=volume,
                            extent=index,
                            gen=rec.gen,
                            offset=offset,
                            length=length,
                        ),
                    )
                except PeerError:
                    continue
                if resp.ok:
                    if bad:
                        await self._repair(rec, member, bad)
                    return resp.payload
                if resp.status is Status.CHECKSUM_MISMATCH:
                    bad[member] = list(resp.fields.get("blocks", []))
                    continue
                if resp.status is Status.NOT_FOUND:
                    absent += 1
                if resp.status is Status.STALE_GENERATION:
                    # our map is behind (refreshed below if nobody serves), or this replica
                    # is: left behind by a change, or ahead of it by a hand-over that never
                    # committed (node.py, `_ahead_of_map`); the others may serve meanwhile
                    continue
            if absent == len(order):
                return bytes(length)  # allocated, never written: no replica was created yet
            if bad and len(bad) == len(order):
                raise MediumError("every replica failed its checksum", lba=None)
            await self.emap.wait_newer(volume, index, rec.gen + 1, 0.5)

    async def _repair(self, rec: ExtentRecord, good: str, bad: dict[str, list[int]]) -> None:
        """Rewrite blocks that failed their checksum with the good replica's copy.

        Only while the extent is quiet: both members at the same `applied_seq` before and
        after the read, and the copy installed only if the bad member has not moved since
        (`if_applied`), so a repair never undoes a write that raced with it. A block skipped
        is repaired by the next read that meets it (or by scrub)."""
        for member, blocks in bad.items():
            for block in blocks:
                off = block * BLOCK_SIZE
                try:
                    seq = await self._applied(member, rec)
                    if seq is None or await self._applied(good, rec) != seq:
                        continue
                    src = await self.call(good, _read_blocks(rec, off, BLOCK_SIZE))
                    if not src.ok or await self._applied(good, rec) != seq:
                        continue
                    data, sums = src.payload[:BLOCK_SIZE], src.payload[BLOCK_SIZE:]
                    resp = await self.call(member, _copy_blocks(rec, off, data, sums, seq))
                except PeerError:
                    continue
                if resp.ok:
                    CHECKSUM_REPAIRS.inc()
                    EVENTS.emit("checksum_repair", f"{rec.volume}/{rec.index}", member)
                    log.warning(
                        "repaired block %d of %s/%d on %s", block, rec.volume, rec.index, member
                    )

    async def _applied(self, chunk_id: str, rec: ExtentRecord) -> int | None:
        st = await self.get_state(chunk_id, rec.volume, rec.index, False)
        return int(st.fields["applied_seq"]) if st.ok else None

    async def get_state(self, chunk_id: str, volume: str, index: int, csum: bool) -> Response:
        return await self.call(chunk_id, lambda i: GetState(i, volume, index, csum))

    # -- allocation (GET LBA STATUS) -----------------------------------------------------------

    async def allocation(self, entry: Entry) -> AllocationMap:
        """The extent's allocation map: from our own replica when it may serve reads, else
        from the primary's checksum array; rebuilt only when the replica changed since."""
        rec = entry.record
        vol, idx = rec.volume, rec.index
        replica = await self.local_reads.replica(vol, idx)
        if replica is not None:
            stamp: tuple[object, ...] = (replica, replica.generation, replica.applied_seq)
            found = self.allocations.get(vol, idx, stamp)
            if found is not None:
                return found
            try:
                return self.allocations.put(vol, idx, stamp, await replica.checksums())
            except ExtentStoreError:
                pass  # the primary answers instead
        try:
            st = await self.get_state(rec.primary, vol, idx, False)
            if st.ok:
                stamp = (rec.primary, st.fields["gen"], st.fields["applied_seq"])
                found = self.allocations.get(vol, idx, stamp)
                if found is not None:
                    return found
                st = await self.get_state(rec.primary, vol, idx, True)
        except PeerError as exc:
            raise NotReady(str(exc)) from None
        if not st.ok:
            raise NotReady(f"extent {vol}/{idx}: {st.status}")
        # keyed by the state read before the array: the array is at least that new
        return self.allocations.put(vol, idx, stamp, st.payload)

    # -- failover ------------------------------------------------------------------------------

    async def failover(self, entry: Entry) -> None:
        """Replace an unreachable primary with the most advanced current survivor."""
        rec = entry.record
        key = (rec.volume, rec.index)
        async with self._failing_over.setdefault(key, asyncio.Lock()):
            now = self.emap.entry(rec.volume, rec.index)
            if now is None or now.mod_revision != entry.mod_revision:
                return  # somebody changed it meanwhile
            primary = rec.primary
            if await self._await_return([primary]) and self.emap.is_live(primary):
                return  # it was away on purpose and is back: retry through it
            # The old primary stops acknowledging when its own lease deadline passes, which is
            # never later than etcd expiring the lease: once its live record is gone, it can
            # no longer acknowledge anything, and a new primary cannot overlap with it.
            try:
                await self.emap.live.wait_for(
                    lambda _: not self.emap.is_live(primary), 3 * self.lease_ttl + 2
                )
            except TimeoutError:
                return  # it is alive after all (a transient error): retry through it
            # A read lease the old primary granted before its own deadline may still run for
            # `read_lease`. The old primary granted nothing after its live record vanished (its
            # own deadline comes first; a crashed one's guard removes the record only once the
            # process is gone), so such leases end `read_lease` after then, not after now.
            # `_promote` waits for that only if it must leave a member out (docs/faults.md).
            gone = self.emap.gone_since(primary)
            leases_end = time.monotonic() if gone is None else gone
            fresh = await self.emap.fresh(rec.volume, rec.index)
            if fresh is None or fresh.mod_revision != entry.mod_revision:
                return
            await self._promote(fresh, leases_end + self.read_lease)

    async def _await_return(self, members: Sequence[str]) -> bool:
        """Wait while any of `members` is away on purpose and expected back (a planned
        restart, or a whole cluster coming back: docs/faults.md), until it serves again or
        its bound passes. Returns whether there was anything to wait for."""
        if self.expected_back is None:
            return False
        waited = False
        while True:
            now = time.monotonic()
            until = max((self.expected_back(m) for m in members), default=0.0)
            if until <= now:
                return waited
            if not waited:
                log.info("waiting up to %.1f s for %s to come back", until - now, members)
            waited = True
            await asyncio.sleep(min(0.1, until - now))

    async def resign(self, volume: str, index: int) -> None:
        """Hand our own primary role to the most advanced other member: our replica was lost
        with its data directory (datadirs.py). No lease wait: we stopped acknowledging for
        the extent before, and the one member that loses data, us, serves no reads of it."""
        async with self._failing_over.setdefault((volume, index), asyncio.Lock()):
            fresh = await self.emap.fresh(volume, index)
            if fresh is None or fresh.record.primary != self.node_id:
                return
            await self._promote(fresh)

    async def recover(self, volume: str, index: int) -> None:
        """We are the extent's primary and its members are not identical: our replica lost
        its page cache (a power loss left it STALE: its applied_seq cut back to what was
        durable), or a member is behind us (a whole cluster crashed mid-write). We
        acknowledge nothing for it meanwhile, so no lease is waited for: the most advanced
        member, us included, resumes (`_promote` with `include_primary`) and the others are
        converged from it."""
        async with self._failing_over.setdefault((volume, index), asyncio.Lock()):
            fresh = await self.emap.fresh(volume, index)
            if fresh is None or fresh.record.primary != self.node_id or fresh.record.converging:
                return
            await self._promote(fresh, include_primary=True)

    async def _promote(
        self, fresh: Entry, leases_end: float = 0.0, *, include_primary: bool = False
    ) -> None:
        """Commit the most advanced current member other than the primary as the new primary
        (converging), then converge. The caller made sure the old primary acknowledges
        nothing any more.

        `leases_end`: until when (monotonic) a read lease the old primary granted may run.
        Every member of the new generation is told it (SetGen) before the extent takes a
        write in it, and refuses reads of the old one from then on, so a lease matters only
        to a member we cannot reach and must leave out: only then is it waited for.

        Members that lost their page cache (STALE after a power loss: they hold the durable
        prefix of the writes) are converged too rather than left out. When no member is
        current (a whole-cluster power loss), the most advanced STALE one resumes: every
        write acknowledged as durable (FUA, SYNCHRONIZE CACHE) reached every member's disk,
        so any member holds all of them, and the most advanced holds the most of the rest;
        but only once every member answered or has no live record (one that is live and
        silent may be current and hold acknowledged writes). `include_primary`: the
        primary is a candidate too (`recover`)."""
        rec = fresh.record
        key = (rec.volume, rec.index)
        primary = rec.primary
        states: dict[str, int] = {}
        stale: dict[str, int] = {}  # lost their page cache: the durable prefix only
        behind: list[str] = []  # members never told a committed change: converged, no source
        absent: list[str] = []
        unknown: list[str] = []  # no answer: may still serve reads of this generation
        answers: dict[str, str] = {}  # what each said: logged for one left out
        for member in rec.replicas if include_primary else rec.replicas[1:]:
            try:
                st = await self.get_state(member, rec.volume, rec.index, False)
            except PeerError as exc:
                answers[member] = str(exc)
                unknown.append(member)
                continue
            answers[member] = f"{st.status} {st.fields}"
            # (gen + 1: a hand-over pushes it to every member, all forwards settled, before
            # its commit; a primary that died in between leaves them ahead of the map)
            fits = st.ok and rec.gen <= st.fields["gen"] <= rec.gen + 1
            if fits and st.fields["state"] == 0:
                states[member] = st.fields["applied_seq"]
            elif fits and st.fields["state"] == int(ReplicaState.STALE):
                stale[member] = st.fields["applied_seq"]
            elif st.ok and st.fields["gen"] <= rec.gen + 1:
                # behind the map (a join committed it, the stop cut its push short) or a
                # joiner never made current: it may miss writes, so never the source, but a
                # member all the same, converged like the others rather than dropped
                behind.append(member)
            elif st.status is Status.NOT_FOUND:
                absent.append(member)
            elif not st.ok:
                unknown.append(member)
        if unknown and await self._await_return(unknown):
            # away on purpose: waited for rather than left out (it may be the most advanced)
            again = await self.emap.fresh(rec.volume, rec.index)
            if again is not None and again.mod_revision == fresh.mod_revision:
                # (include_primary kept: without it a recovery that waited became a failover
                # that left us, the primary, out: seen after a whole-cluster restart)
                await self._promote(again, leases_end, include_primary=include_primary)
            return
        if include_primary and any(self.emap.is_live(m) for m in unknown):
            # Recovering, not failing over: we acknowledge nothing meanwhile, and a live
            # member that does not answer yet (a whole-cluster restart: its live record
            # from before is still there, its process not) would be left out and come back
            # by a copy. The next request or repair pass tries again; once its record is
            # gone it is left out as before.
            log.warning("extent %s/%d: waiting for %s to answer before converging", *key, unknown)
            return
        if unknown and time.monotonic() < leases_end:
            await asyncio.sleep(leases_end - time.monotonic())
            again = await self.emap.fresh(rec.volume, rec.index)
            if again is not None and again.mod_revision == fresh.mod_revision:
                # the members' states once more, after the wait
                await self._promote(again, include_primary=include_primary)
            return
        if not states and not stale and absent and len(absent) == len(rec.replicas) - 1:
            # No survivor ever got a replica, so no write was ever acknowledged (an ack
            # needs every member): the extent starts over, empty, on the survivors.
            await self.emap.replace(
                fresh,
                dataclasses.replace(rec, gen=rec.gen + 1, replicas=absent, converging=False),
            )
            return
        if not states and stale and any(self.emap.is_live(m) for m in unknown):
            log.warning("extent %s/%d: no current member; waiting for %s", *key, unknown)
            return
        if not states and not stale:
            log.error("extent %s/%d: no current survivor of gen %d", *key, rec.gen)
            return
        # Every acknowledged write is on every current survivor; the most advanced survivor
        # also holds the unacknowledged tail, which the others then copy from it.
        candidates = states or stale
        order = [m for m in rec.replicas if m in states or m in stale or m in behind]
        best = max(
            (m for m in order if m in candidates), key=lambda m: (candidates[m], -order.index(m))
        )
        members = [best] + [m for m in order if m != best]
        examined = rec.replicas if include_primary else rec.replicas[1:]
        left = {m: answers.get(m, "no answer") for m in examined if m not in members}
        if left:  # a member removed here comes back only by a copy: say why
            how = "recovering" if include_primary else "failing over"
            log.warning("extent %s/%d, %s: left out of gen %d: %s", *key, how, rec.gen + 1, left)
        new = dataclasses.replace(rec, gen=rec.gen + 1, replicas=members, converging=True)
        committed = await self.emap.replace(fresh, new)
        if committed is None:
            return
        if best == primary:  # (include_primary) the others converge from us
            log.warning("extent %s/%d: %s resumes, members converge (gen %d)", *key, best, new.gen)
            await self._converge(committed)
            return
        FAILOVERS.inc()
        EVENTS.emit("failover", f"{rec.volume}/{rec.index}", f"{primary} -> {best}, gen {new.gen}")
        log.warning(
            "extent %s/%d: primary %s replaced by %s (gen %d)", *key, primary, best, new.gen
        )
        await self._converge(committed)

    async def converge(self, entry: Entry, *, own: bool = False) -> None:
        """Finish the convergence of an extent found converging.

        One converger at a time: a second one still at work after the first opened the extent
        would set a member's applied_seq back behind writes the new primary already sent it
        (the member then refuses the next one as out of order and is dropped: the
        `out_of_order` after a failover, issue 14) or copy older blocks over newer ones. So
        the committer converges (`own`: the entry it committed); anyone else (another access
        point, the repairer) leaves it to the committer for `converge_grace`, then takes it
        over under a generation of its own (gen + 1, still converging): every member then
        refuses the committer's late requests, should it still be at work."""
        key = (entry.record.volume, entry.record.index)
        async with self._failing_over.setdefault(key, asyncio.Lock()):
            now = self.emap.entry(*key)
            if now is None or not now.record.converging:
                self._converging_since.pop(key, None)
                return
            if not own or now.mod_revision != entry.mod_revision:
                seen = self._converging_since.get(key)
                if seen is None or seen[0] != now.mod_revision:
                    self._converging_since[key] = (now.mod_revision, time.monotonic())
                    return
                if time.monotonic() - seen[1] < self.converge_grace:
                    return
                claimed = await self.emap.replace(
                    now, dataclasses.replace(now.record, gen=now.record.gen + 1)
                )
                if claimed is None:
                    return
                log.warning(
                    "extent %s/%d: converging since gen %d, taken over (gen %d)",
                    *key,
                    now.record.gen,
                    claimed.record.gen,
                )
                now = claimed
            await self._converge(now)

    async def _converge(self, entry: Entry) -> None:
        """Make every member identical to the new primary, then open the extent for writes.

        Only the committer of `entry` runs this (see `converge`). No member accepts writes
        meanwhile (the primary refuses while `converging`)."""
        rec = entry.record
        vol, idx, gen = rec.volume, rec.index, rec.gen
        primary = rec.primary
        try:
            resp = await self.call(primary, lambda i: SetGen(i, vol, idx, gen))
            if not resp.ok:
                raise NotReady(f"new primary {primary} refused gen {gen}: {resp.status}")
            src = await self.get_state(primary, vol, idx, True)  # (rescans a STALE one)
            if not src.ok:
                raise NotReady(f"new primary {primary}: {src.status}")
            applied = src.fields["applied_seq"]
            src_sums = src.payload
            if src.fields["state"] != 0:
                # the most advanced after a power loss: its durable prefix, rescanned, is
                # the extent's content from now on
                resp = await self.call(
                    primary, lambda i: SetGen(i, vol, idx, gen, applied_seq=applied, state=0)
                )
                if not resp.ok:
                    raise NotReady(f"new primary {primary} refused current: {resp.status}")
                log.warning("extent %s/%d: %s resumes after a lost page cache", vol, idx, primary)
            for member in rec.replicas[1:]:
                resp = await self.call(member, lambda i: SetGen(i, vol, idx, gen))
                if not resp.ok:
                    raise NotReady(f"member {member} refused gen {gen}: {resp.status}")
                dst = await self.get_state(member, vol, idx, True)
                if not dst.ok:
                    raise NotReady(f"member {member}: {dst.status}")
                copied = await self._copy_differences(primary, member, rec, src_sums, dst.payload)
                resp = await self.call(
                    member, lambda i: SetGen(i, vol, idx, gen, applied_seq=applied, state=0)
                )
                if not resp.ok:
                    raise NotReady(f"member {member} refused applied_seq: {resp.status}")
                log.warning("extent %s/%d: %d blocks copied to %s", vol, idx, copied, member)
        except PeerError as exc:
            log.error("extent %s/%d: converging failed: %s", vol, idx, exc)
            return
        except NotReady as exc:
            log.error("extent %s/%d: converging failed: %s", vol, idx, exc)
            return
        done = dataclasses.replace(rec, gen=gen, replicas=list(rec.replicas), converging=False)
        await self.emap.replace(entry, done)

    async def _copy_differences(
        self, src: str, dst: str, rec: ExtentRecord, a: bytes, b: bytes
    ) -> int:
        n = len(a) // CHECKSUM_SIZE
        differ = [
            i
            for i in range(n)
            if a[i * CHECKSUM_SIZE : (i + 1) * CHECKSUM_SIZE]
            != b[i * CHECKSUM_SIZE : (i + 1) * CHECKSUM_SIZE]
        ]
        per = COPY_CHUNK // BLOCK_SIZE
        runs: list[tuple[int, int]] = []
        for i in differ:
            if runs and runs[-1][0] + runs[-1][1] == i and runs[-1][1] < per:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
        for first, count in runs:
            off, size = first * BLOCK_SIZE, count * BLOCK_SIZE
            got = await self.call(src, _read_blocks(rec, off, size))
            if not got.ok:
                raise NotReady(f"reading {src} for a copy: {got.status}")
            data, sums = got.payload[:size], got.payload[size:]
            put = await self.call(dst, _copy_blocks(rec, off, data, sums))
            if not put.ok:
                raise NotReady(f"copying to {dst}: {put.status}")
        return len(differ)


class ReplicatedVolume:
    """A volume as a `BlockDevice`: every extent piece goes through the `AccessPath`."""

    def __init__(self, record: VolumeRecord, path: AccessPath, extent_size: int) -> None:
        self.record = record
        self.path = path
        self.extent_size = extent_size
        self._capacity_generation = 0
        self._dirty: set[int] = set()  # extents written since the last flush
        self._caw_locks: dict[int, asyncio.Lock] = {}  # the fallback path only
        self.io = VolumeIo(record.id)  # its IO metrics at this access point

    def update(self, record: VolumeRecord) -> None:
        """A new version of the volume record (expand): capacity may change."""
        if record.size_bytes != self.record.size_bytes:
            self._capacity_generation += 1
        self.record = record

    # -- BlockDevice properties ------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self.record.block_size

    @property
    def physical_block_size(self) -> int:
        return BLOCK_SIZE

    @property
    def num_blocks(self) -> int:
        return self.record.size_bytes // self.record.block_size

    @property
    def read_only(self) -> bool:
        return False

    @property
    def thin(self) -> bool:
        return True

    @property
    def capacity_generation(self) -> int:
        return self._capacity_generation

    # -- IO ----------------------------------------------------------------------------------
    # Each method runs its body in a task of its own: the iSCSI layer drives the first step of
    # a command coroutine inline, outside any task, where asyncio.timeout() (used by the
    # etcd and peer clients) raises "Timeout should be used inside a task".

    # -- inline IO (blockdev.InlineBlockDevice: the iSCSI command fast path) -----------------
    # Reads of an extent held here are answered inline from the local replica; anything else
    # (and every write: replicated, it must await its primary) raises NotReady, on which the
    # fast path runs the command through the full path instead.

    inline_ok = True
    inline_writes = False  # the fast path does not even try: write_inline always declines

    def read_inline(self, lba: int, blocks: int) -> memoryview:
        start = time.perf_counter()
        offset, length = self._range(lba, blocks)
        index, within = divmod(offset, self.extent_size)
        if within + length <= self.extent_size:
            data = self.path.local_reads.read_now(self.record.id, index, within, length)
            if data is not None:
                self.io.done("read", length, start)
                return data
        raise NotReady("not a local read: the full path")

    def write_inline(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        raise NotReady("a replicated write awaits its primary: the full path")

    async def read(self, lba: int, blocks: int) -> bytes | memoryview:
        # The local fast path first (local_read.py): within one extent held here, no task.
        start = time.perf_counter()
        offset, length = self._range(lba, blocks)
        index, within = divmod(offset, self.extent_size)
        if within + length <= self.extent_size:
            data = await self.path.local_reads.read(self.record.id, index, within, length)
            if data is not None:
                self.io.done("read", length, start)
                return data
        # Only a read that needs another server counts for locality: a member reads its own
        # replica without being primary, and a second path that only reads (multipath) must
        # not take the primary away from the access point that writes.
        rec = self.path.emap.get(self.record.id, index)
        if rec is None or self.path.node_id not in rec.replicas:
            self.path.activity.note(self.record.id, index)
        return await self.io.timed("read", length, asyncio.ensure_future(self._read(lba, blocks)))

    async def write(
        self,
        lba: int,
        data: bytes | bytearray | memoryview,
        fua: bool,
        nexus: ScsiNexus | None = None,
    ) -> None:
        # The fast path first (docs/datapath.md, "The hot path, step by step"): a write
        # within one extent whose primary is this process, taken by `DataNode.write_now`,
        # is applied and forwarded in this call and awaited as a `Completion`, which the
        # iSCSI server resumes from its callback: no Task at the access point.
        start = time.perf_counter()
        index, done = self._write_now(lba, data, fua, nexus)
        if done is not None:
            try:
                await done
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused after it was applied here: the full path
                log.info("a fast write to %s/%d: %s; retried", self.record.id, index, exc)
            else:
                SEQUENCED.inc()
                SEQUENCED_LOCAL.inc()
                self._dirty.add(index)
                self.io.done("write", len(data), start)
                return
        await self.io.timed(
            "write", len(data), asyncio.ensure_future(self._write(lba, data, fua, nexus))
        )

    def _write_now(
        self,
        lba: int,
        data: bytes | bytearray | memoryview,
        fua: bool,
        nexus: ScsiNexus | None,
    ) -> tuple[int, Completion | None]:
        """(extent, the write's completion) when `DataNode.write_now` took it; (extent or -1,
        None) with nothing done otherwise. What `_write` -> `mutate` -> `DataNode.handle`
        would do, minus every await: only the case where none of them waits."""
        path = self.path
        node = path.replicas.local
        if fua or node is None:
            return -1, None
        bs = self.block_size
        blocks = len(data) // bs
        if lba < 0 or blocks <= 0 or lba + blocks > self.num_blocks:
            return -1, None
        index, within = divmod(lba * bs, self.extent_size)
        length = blocks * bs
        if within + length > self.extent_size:
            return index, None  # two pieces: `gather`, in a Task
        vol = self.record.id
        rec = self._led_here(index)
        if rec is None:
            return index, None
        epoch = None
        if nexus is not None and path.epochs is not None:
            try:
                epoch = path.epochs.epoch_now(nexus)
            except NotReady:
                return index, None
        req = Write(0, vol, index, rec.gen, 0, within, False, _payload(data, 0, length), epoch)
        path.activity.note(vol, index)
        try:
            settling = node.write_now(req)
        except Exception:  # Fenced, Unavailable, a store error: the full path reports it
            return index, None
        if settling is None:
            return index, None
        # (given the loop: looking it up costs a getpid() system call in 3.11)
        done = Completion(loop=settling.done.get_loop())
        settling.done.add_done_callback(partial(_relay, done))
        return index, done

    async def flush(self) -> None:
        # The fast path first (docs/datapath.md, "QD1 write+flush, step by step"): one
        # extent written since the last flush, whose primary is this process, flushed by
        # `DataNode.primary_flush` awaited right here. The full path (a Task, `gather`,
        # `mutate`, the shielded handler) adds loop iterations before the members' Flush
        # frames leave and after their answers, on the line a database commit waits on.
        here = self._flush_here()
        if here is not None:
            node, index, gen = here
            self._dirty.discard(index)
            try:
                await node.primary_flush(self.record.id, index, gen)
            except asyncio.CancelledError:
                # Not answered: nothing was promised. (Unshielded, unlike the handler's
                # writes: a flush cut short leaves no ordering state behind, and the
                # next flush of the extent syncs every member again.)
                self._dirty.add(index)
                raise
            except Exception as exc:  # stale map, a member lost, ...: the full path retries
                log.info("a fast flush of %s/%d: %s; retried", self.record.id, index, exc)
                self._dirty.add(index)
            else:
                return
        await asyncio.ensure_future(self._flush())

    def _flush_here(self) -> tuple[DataNode, int, int] | None:
        """(this process's node, extent, gen) when the one extent to flush is led here, so
        `DataNode.primary_flush` can take it (what `mutate` -> `DataNode.handle` would
        check), else None."""
        node = self.path.replicas.local
        if len(self._dirty) != 1 or node is None:
            return None
        (index,) = self._dirty
        rec = self._led_here(index)
        return None if rec is None else (node, index, rec.gen)

    def _led_here(self, index: int) -> ExtentRecord | None:
        """The extent's record when this process leads it now (its primary, live, not
        converging, and this worker's), as `DataNode.handle` would check; else None. The
        fast write and flush paths ask it; anything else takes the full path."""
        path = self.path
        vol = self.record.id
        entry = path.emap.entry(vol, index)
        if entry is None:
            return None
        rec = entry.record
        if rec.primary != path.node_id or rec.converging or not path.emap.is_live(rec.primary):
            return None
        worker = path.replicas.worker
        if worker is not None and owner(vol, worker.count) != worker.index:
            return None  # a sibling worker's extent
        return rec

    async def unmap(
        self, ranges: Sequence[tuple[int, int]], nexus: ScsiNexus | None = None
    ) -> None:
        await asyncio.ensure_future(self._unmap(ranges, nexus))

    async def write_same(
        self,
        lba: int,
        blocks: int,
        pattern: bytes | bytearray | memoryview,
        unmap: bool,
        nexus: ScsiNexus | None = None,
    ) -> None:
        await asyncio.ensure_future(self._write_same(lba, blocks, pattern, unmap, nexus))

    async def compare_and_write(
        self,
        lba: int,
        verify: bytes | bytearray | memoryview,
        data: bytes | bytearray | memoryview,
        nexus: ScsiNexus | None = None,
    ) -> None:
        await asyncio.ensure_future(self._compare_and_write(lba, verify, data, nexus))

    async def lba_status(self, lba: int) -> Sequence[LbaStatus]:
        return await asyncio.ensure_future(self._lba_status(lba))

    def _range(self, lba: int, blocks: int) -> tuple[int, int]:
        if lba < 0 or blocks < 0 or lba + blocks > self.num_blocks:
            raise OutOfRange(f"LBA {lba}+{blocks} beyond {self.num_blocks} blocks")
        return lba * self.block_size, blocks * self.block_size

    async def _read(self, lba: int, blocks: int) -> bytes:
        offset, length = self._range(lba, blocks)
        pieces = split(offset, length, self.extent_size)
        vol = self.record.id
        base = self.record.base
        parts = await asyncio.gather(
            *(self.path.read(vol, p.extent, p.offset, p.length, base) for p in pieces)
        )
        return b"".join(parts)

    async def _write(
        self,
        lba: int,
        data: bytes | bytearray | memoryview,
        fua: bool,
        nexus: ScsiNexus | None = None,
    ) -> None:
        offset, length = self._range(lba, len(data) // self.block_size)
        view = memoryview(data)
        vol, replicas = self.record.id, self.record.replicas
        epoch = await self.path.nexus_epoch(nexus)

        async def one(p: Piece) -> None:
            chunk = _payload(view, p.start, p.length)

            def build(i: int, gen: int) -> Request:
                return Write(i, vol, p.extent, gen, 0, p.offset, fua, chunk, epoch)

            self.path.activity.note(vol, p.extent)
            await self.path.mutate(
                vol, p.extent, replicas, build, allocate=True, base=self.record.base, sequenced=True
            )
            self._dirty.add(p.extent)

        pieces = split(offset, length, self.extent_size)
        if len(pieces) == 1:
            await one(pieces[0])  # the usual case: no Task (gather makes one per piece)
        else:
            await asyncio.gather(*(one(p) for p in pieces))

    async def _flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        vol, replicas = self.record.id, self.record.replicas

        async def one(index: int) -> None:
            def build(i: int, gen: int) -> Request:
                return Flush(i, vol, index, gen)

            await self.path.mutate(vol, index, replicas, build, allocate=False)

        try:
            await asyncio.gather(*(one(i) for i in sorted(dirty)))
        except BaseException:
            self._dirty |= dirty
            raise

    async def _unmap(
        self, ranges: Sequence[tuple[int, int]], nexus: ScsiNexus | None = None
    ) -> None:
        vol, replicas = self.record.id, self.record.replicas
        epoch = await self.path.nexus_epoch(nexus)
        # Merge overlapping and adjacent descriptors, then unmap every piece concurrently:
        # an UNMAP may carry hundreds of descriptors and their order does not matter.
        spans = sorted(self._range(lba, blocks) for lba, blocks in ranges if blocks)
        merged: list[list[int]] = []
        for offset, length in spans:
            if merged and offset <= merged[-1][0] + merged[-1][1]:
                end = max(merged[-1][0] + merged[-1][1], offset + length)
                merged[-1][1] = end - merged[-1][0]
            else:
                merged.append([offset, length])

        async def one(p: Piece) -> None:
            def build(i: int, gen: int) -> Request:
                return Unmap(i, vol, p.extent, gen, 0, p.offset, p.length, False, epoch)

            # a clone's extent read from its source is copied first, then unmapped
            await self.path.mutate(
                vol, p.extent, replicas, build, allocate=False, base=self.record.base
            )

        for lba, blocks in ranges:  # every descriptor is checked, empty ones too
            self._range(lba, blocks)
        pieces = [p for off, n in merged for p in split(off, n, self.extent_size)]
        await asyncio.gather(*(one(p) for p in pieces))

    async def _write_same(
        self,
        lba: int,
        blocks: int,
        pattern: bytes | bytearray | memoryview,
        unmap: bool,
        nexus: ScsiNexus | None = None,
    ) -> None:
        self._range(lba, blocks)
        if unmap and not any(pattern):
            await self._unmap([(lba, blocks)], nexus)
            return
        step = max(1, (4 << 20) // self.block_size)
        for start in range(lba, lba + blocks, step):
            n = min(step, lba + blocks - start)
            await self._write(start, bytes(pattern) * n, False, nexus)

    async def _compare_and_write(
        self,
        lba: int,
        verify: bytes | bytearray | memoryview,
        data: bytes | bytearray | memoryview,
        nexus: ScsiNexus | None = None,
    ) -> None:
        """Atomic across access points when it lies within one extent: a `caw` executed by
        the extent's primary inside its ordering (docs/datapath.md, "COMPARE AND WRITE").
        The LU caps COMPARE AND WRITE at one block (Block Limits VPD), so every SCSI one
        does; only an ORWRITE's compare-and-write can span extents and takes the fallback."""
        offset, length = self._range(lba, len(verify) // self.block_size)
        pieces = split(offset, length, self.extent_size)
        old, new = bytes(verify), bytes(data)
        if len(pieces) == 1 and self.path.caw_at_primary:
            try:
                await self._caw_at_primary(pieces[0], old, new, nexus)
                return
            except PrimaryRefused as exc:  # an older primary (a rolling upgrade)
                log.warning("volume %s: CAW at this access point: %s", self.record.id, exc)
        await self._compare_and_write_here(lba, old, new, nexus)

    async def _caw_at_primary(
        self, p: Piece, verify: bytes, data: bytes, nexus: ScsiNexus | None
    ) -> None:
        vol = self.record.id
        epoch = await self.path.nexus_epoch(nexus)
        token = secrets.randbits(64) | 1  # every retry of this command carries it

        def build(i: int, gen: int) -> Request:
            return CompareAndWrite(
                i, vol, p.extent, gen, p.offset, p.length, False, verify, data, epoch, token
            )

        self.path.activity.note(vol, p.extent)
        # a clone's extent read from its source is copied first, as for a write
        await self.path.mutate(
            vol, p.extent, self.record.replicas, build, allocate=True,
            base=self.record.base, sequenced=True,
        )  # fmt: skip
        self._dirty.add(p.extent)

    async def _compare_and_write_here(
        self, lba: int, verify: bytes, data: bytes, nexus: ScsiNexus | None
    ) -> None:
        """The fallback: read, compare and write under a per-extent lock of this access point,
        atomic against this access point's other commands only."""
        offset, _ = self._range(lba, len(verify) // self.block_size)
        first = offset // self.extent_size
        async with self._caw_locks.setdefault(first, asyncio.Lock()):
            current = await self._read(lba, len(verify) // self.block_size)
            if current != verify:
                raise Miscompare(first_difference(current, verify))
            await self._write(lba, data, False, nexus)

    async def _lba_status(self, lba: int) -> Sequence[LbaStatus]:
        """Runs from `lba` on, across extent boundaries (at most LBA_STATUS_RUNS runs and
        LBA_STATUS_EXTENTS extents a call), from cached allocation maps (allocation.py)."""
        offset, _ = self._range(lba, 1)
        bs, size, esize = self.block_size, self.record.size_bytes, self.extent_size
        out: list[LbaStatus] = []
        pos = offset
        first = offset // esize
        indexes = range(first, min(first + LBA_STATUS_EXTENTS, -(-size // esize)))
        async with self.path.emap.serving(self.record.id):
            entries = await self.path.emap.entries_now(self.record.id, indexes)
            for index in indexes:
                amap = await self._allocation(index, entries[index])
                base = index * esize
                ext_end = min(base + esize, size)
                while pos < ext_end:
                    if amap is None:
                        mapped, end = False, ext_end
                    else:
                        mapped, block = amap.run_at((pos - base) // BLOCK_SIZE)
                        end = min(ext_end, base + block * BLOCK_SIZE)
                    state = LbaState.MAPPED if mapped else LbaState.DEALLOCATED
                    last = out[-1] if out else None
                    if last is not None and last.state is state:
                        out[-1] = LbaStatus(last.lba, (end - last.lba * bs) // bs, state)
                    elif len(out) == LBA_STATUS_RUNS:
                        return out
                    else:
                        out.append(LbaStatus(pos // bs, (end - pos) // bs, state))
                    pos = end
            return out

    async def _allocation(self, index: int, entry: Entry | None) -> AllocationMap | None:
        """The allocation map of extent `index` (`entry`: ours, None if never written); None:
        nothing allocated (reads as zeros)."""
        if entry is None and self.record.base:
            entry = await self.path.source(self.record.base, index)  # a clone reads through
        if entry is None:
            return None
        return await self.path.allocation(entry)


def _relay(done: Completion, settled: asyncio.Future[int]) -> None:
    """A fast write's forwards settled: its command's `Completion` gets the outcome (unless
    the command was aborted meanwhile; the write settled all the same)."""
    exc = None if settled.cancelled() else settled.exception()
    if done.done():
        return
    if exc is None:
        done.set_result(None)
    else:
        done.set_exception(exc)


def _payload(data: bytes | bytearray | memoryview, start: int, length: int) -> bytes | memoryview:
    """`length` bytes of a SCSI write's data from `start`, for a `Write` (VIEW_WRITES_FROM)."""
    part = memoryview(data)[start : start + length]
    return part if length >= VIEW_WRITES_FROM else bytes(part)
