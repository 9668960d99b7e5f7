"""The chunk server's data node: the extent store behind the data port, plus the primary's job
(order writes, forward them to the secondaries, remove a failed secondary). docs/datapath.md.

Wire conventions on top of docs/data-protocol.md (version 1 has no separate access ops):

* `write`/`unmap` with `seq = 0` is an **access write**: the sender (an access point) asks the
  extent's primary to order it. Replica-level writes always carry `seq >= 1` (a replica's
  first expected seq is 1), so the two never mix. The `ok` answer's `applied` is the seq the
  primary assigned.
* `flush` received by the extent's primary flushes every replica of the extent; received by
  a secondary, only its own copy.
* `unavailable` from a primary: it cannot acknowledge now (below `min_replicas`, its own lease
  not provably alive, the extent converging after a failover): the access point retries.
* `stale_generation` from a primary: the sender's map is older (or newer) than the primary's.

Requests are handled concurrently (one task each, started in arrival order): ordered
mutations still reach each replica's FIFO lock in arrival order, so `seq` order holds, and an
access point's pipelined writes to one primary no longer wait for each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

from prometheus_client import Counter

from lunastor.chunk.replication.extentmap import Entry, ExtentMap
from lunastor.chunk.replication.fencing import EpochTable, Fenced
from lunastor.chunk.replication.replicas import DataService, error_response
from lunastor.chunk.replication.snapshots import PreserveFailed, clone_from_origin, preserve
from lunastor.chunk.store import (
    DataDirFailed,
    ExtentStore,
    ExtentStoreError,
    Replica,
    ReplicaNotFound,
    ReplicaState,
)
from lunastor.chunk.wire.messages import (
    Create,
    Flush,
    GetState,
    Nexus,
    Ping,
    Preserve,
    Read,
    Request,
    Response,
    SetGen,
    Status,
    Unmap,
    Write,
    clip_message,
)
from lunastor.chunk.wire.peer import PeerClient, PeerError, PeerUnavailable
from lunastor.chunk.wire.session import ServerConnection
from lunastor.common.events import EVENTS
from lunastor.common.records import ExtentRecord, parse_preserved

log = logging.getLogger(__name__)

MEMBERS_REMOVED = Counter(
    "lunastor_replicas_removed_total", "Secondaries removed from an extent by its primary"
)
WRITES_FENCED = Counter(
    "lunastor_writes_fenced_total",
    "Access writes and unmaps refused by this primary: their nexus logged in again since",
)


class Unavailable(Exception):
    """The primary cannot acknowledge now; the access point retries."""


class PrimaryReplicaLost(Unavailable):
    """We are the extent's primary but our replica is gone while the others hold data: the
    repair loop hands the extent to a secondary (repair.py)."""


class StaleMap(Exception):
    """The sender's generation is not the primary's: refresh the map and retry."""

    def __init__(self, gen: int) -> None:
        super().__init__(f"extent generation is {gen}")
        self.gen = gen


# -- talking to replicas, local or remote ------------------------------------------------------


class Replicas:
    """One call interface to every chunk server's data node; our own is called in-process."""

    def __init__(self, emap: ExtentMap, secret: bytes, node_id: str) -> None:
        self.emap = emap
        self.secret = secret
        self.node_id = node_id
        self.local: DataNode | None = None
        self._clients: dict[str, tuple[str, PeerClient]] = {}

    def client(self, chunk_id: str) -> PeerClient:
        address = self.emap.data_address(chunk_id)
        if address is None:
            raise PeerUnavailable(f"chunk server {chunk_id} has no known data address")
        known = self._clients.get(chunk_id)
        if known is not None and known[0] == address:
            return known[1]
        host, _, port = address.rpartition(":")
        client = PeerClient(
            host.strip("[]"), int(port), self.secret, self.node_id, request_timeout=20.0
        )
        self._clients[chunk_id] = (address, client)
        return client

    async def call(self, chunk_id: str, build: Callable[[int], Request]) -> Response:
        if chunk_id == self.node_id and self.local is not None:
            return await self.local.handle(build(0))
        return await self.client(chunk_id).call(build)

    async def close(self) -> None:
        for _, client in self._clients.values():
            await client.close()
        self._clients.clear()


# -- the primary's per-extent state ------------------------------------------------------------


@dataclass
class PrimaryExtent:
    volume: str
    index: int
    gen: int
    members: list[str]  # members[0] is us
    replica: Replica
    next_seq: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # seq order; membership changes
    inflight: int = 0  # forwards sent and not yet settled
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    # A member being added (docs/datapath.md, "Joining a member"): it gets every ordered write
    # too, but its failure only ends the join (join.py), never a write or a real member.
    joining: str | None = None
    copies: int = 0  # the volume's replica count (ExtentRecord.copies), 0 if not recorded

    def settle(self, n: int) -> None:
        self.inflight -= n
        if self.inflight == 0:
            self.idle.set()


# -- the data node -----------------------------------------------------------------------------


class DataNode(DataService):
    def __init__(
        self,
        store: ExtentStore,
        emap: ExtentMap,
        replicas: Replicas,
        node_id: str,
        *,
        alive: Callable[[], bool],
        min_replicas: int,
        read_lease: float,
        epochs: EpochTable | None = None,
    ) -> None:
        super().__init__(store)
        self.emap = emap
        self.replicas = replicas
        self.node_id = node_id
        self.alive = alive
        self.min_replicas = min_replicas
        # Nexus epochs (docs/datapath.md, "Fencing stale writes"); None: fencing is off
        self.epochs = epochs
        # Read leases (docs/datapath.md, "Read leases"): a secondary serves reads of an extent
        # only while it holds a lease from the extent's primary, renewed by pinging it; the
        # primary removes a member only once any lease it granted that member has run out.
        self.read_lease = read_lease
        self._granted: dict[str, float] = {}  # peer -> when we last granted it (monotonic)
        self._leases: dict[str, float] = {}  # primary -> until when we hold its lease
        self._lease_task: asyncio.Task[None] | None = None
        self._primaries: dict[tuple[str, int], PrimaryExtent] = {}
        self._setup: dict[tuple[str, int], asyncio.Lock] = {}
        # Replicas lost with a failed data directory (datadirs.py): never recreated empty
        # while the extent map still names us a member of their extent.
        self.lost: set[tuple[str, int]] = set()
        self.on_data_dir_failed: Callable[[DataDirFailed], None] | None = None
        replicas.local = self

    def data_dir_failed(self, exc: DataDirFailed) -> None:
        if self.on_data_dir_failed is not None:
            self.on_data_dir_failed(exc)

    def step_down(self, volume: str, index: int) -> None:
        """Forget our primary state for an extent (its replica was lost with its data dir)."""
        self._primaries.pop((volume, index), None)

    def _lost_here(self, volume: str, index: int) -> bool:
        rec = self.emap.get(volume, index)
        return (volume, index) in self.lost and rec is not None and self.node_id in rec.replicas

    # -- read leases -----------------------------------------------------------------------

    def start(self) -> None:
        self._lease_task = asyncio.create_task(self._renew_leases(), name="read leases")

    async def stop(self) -> None:
        if self._lease_task is not None:
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease_task

    def grant(self, peer: str) -> bool:
        """A peer pinged us: grant it a read lease, if we can still act as a primary."""
        if not self.alive():
            return False
        self._granted[peer] = time.monotonic()
        return True

    async def _renew_leases(self) -> None:
        while True:
            peers = [s.id for s in self.emap.live_servers() if s.id != self.node_id]
            await asyncio.gather(*(self._renew(p) for p in peers))
            await asyncio.sleep(self.read_lease / 3)

    async def _renew(self, peer: str) -> None:
        sent = time.monotonic()  # the lease runs from before the grant: never past the promise
        try:
            async with asyncio.timeout(self.read_lease / 2):
                resp = await self.replicas.client(peer).ping()
        except (PeerError, TimeoutError):
            return
        if resp.ok:
            self._leases[peer] = sent + self.read_lease * 0.9

    def may_serve_read(self, volume: str, index: int) -> bool:
        if parse_preserved(volume) is not None:
            return True  # a snapshot's preserved copy is never written: every replica is current
        rec = self.emap.get(volume, index)
        if rec is None or rec.primary == self.node_id:
            return self.alive() or rec is None
        return time.monotonic() < self._leases.get(rec.primary, 0.0)

    async def _lease_expiry(self, members: list[str]) -> None:
        """Wait until no read lease we granted these members can still be running."""
        until = max((self._granted.get(m, 0.0) + self.read_lease for m in members), default=0.0)
        delay = until - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def handle(self, req: Request) -> Response:
        if isinstance(req, Read) and not self.may_serve_read(req.volume, req.extent):
            return Response(
                req.id,
                Status.NOT_CURRENT,
                {"message": "no read lease from the extent's primary"},
            )
        # The primary's part runs shielded: when the access point goes away (its connection
        # drops, or its iSCSI session and with it the command task), the request's task is
        # cancelled, but a write applied locally must still be counted and forwarded. Cut
        # short inside the replica's FUA flush, it left `applied_seq` one ahead of the
        # primary's `next_seq`, and every later write of the extent failed as out of order.
        if (
            isinstance(req, Create)
            and req.state == ReplicaState.CURRENT
            and self._lost_here(req.volume, req.extent)
        ):
            # an empty replica in place of the lost one would serve zeros as current data
            lost = "this server's replica was lost with its data directory"
            return Response(req.id, Status.UNAVAILABLE, {"message": lost})
        try:
            if isinstance(req, Read) and self._sole_copy(req.volume, req.extent):
                # a read may come before any write since a restart: set the extent up as
                # its primary first, which resumes a copy that lost its page cache
                await self._primary(req.volume, req.extent, req.gen)
            if isinstance(req, Write) and req.seq == 0:
                seq = await asyncio.shield(
                    self.primary_write(
                        req.volume, req.extent, req.gen, req.offset, req.data, req.fua, req.nexus
                    )
                )
                return Response(req.id, Status.OK, {"applied_seq": seq})
            if isinstance(req, Unmap) and req.seq == 0:
                seq = await asyncio.shield(
                    self.primary_unmap(
                        req.volume, req.extent, req.gen, req.offset, req.length, req.fua, req.nexus
                    )
                )
                return Response(req.id, Status.OK, {"applied_seq": seq})
            if isinstance(req, Write | Unmap) and req.nexus and self.epochs is not None:
                self.epochs.note(req.nexus)  # forwarded: the primary accepted this epoch
            if isinstance(req, Flush) and self._is_primary(req.volume, req.extent):
                await asyncio.shield(self.primary_flush(req.volume, req.extent, req.gen))
                return Response(req.id, Status.OK)
            if isinstance(req, Preserve):
                await self.primary_preserve(req.volume, req.extent, req.gen)
                return Response(req.id, Status.OK)
        except StaleMap as exc:
            msg = clip_message(str(exc))
            return Response(req.id, Status.STALE_GENERATION, {"gen": exc.gen, "message": msg})
        except Fenced as exc:
            WRITES_FENCED.inc()
            log.warning("refused a write: %s", exc)
            msg = clip_message(str(exc))
            return Response(req.id, Status.FENCED, {"epoch": exc.newest, "message": msg})
        except Unavailable as exc:
            return Response(req.id, Status.UNAVAILABLE, {"message": clip_message(str(exc))})
        except ExtentStoreError as exc:
            if isinstance(exc, DataDirFailed):
                self.data_dir_failed(exc)
            return error_response(req.id, exc)
        return await super().handle(req)

    def _sole_copy(self, volume: str, index: int) -> bool:
        rec = self.emap.get(volume, index)
        return rec is not None and rec.replicas == [self.node_id]

    def _is_primary(self, volume: str, index: int) -> bool:
        rec = self.emap.get(volume, index)
        return rec is not None and rec.primary == self.node_id

    async def lead(self, volume: str, index: int) -> PrimaryExtent:
        """Our primary state of the extent at the map's generation (join.py, repair.py)."""
        rec = self.emap.get(volume, index)
        if rec is None:
            raise Unavailable(f"extent {volume}/{index} is not in the map")
        return await self._primary(volume, index, rec.gen)

    def current(self, pe: PrimaryExtent) -> bool:
        """Whether `pe` is still our primary state of its extent."""
        return self._primaries.get((pe.volume, pe.index)) is pe

    def leading(self, volume: str, index: int) -> bool:
        """Whether we hold primary state for the extent (it is open for writes here)."""
        return (volume, index) in self._primaries

    def forget(self, pe: PrimaryExtent) -> None:
        """We are no longer the extent's primary (we handed it over)."""
        if self.current(pe):
            del self._primaries[(pe.volume, pe.index)]

    async def remove_members(self, pe: PrimaryExtent, members: list[str]) -> None:
        """Remove members (dead, or retired by a drain): gen + 1, as for a failed secondary."""
        await self._remove(pe, members)

    # -- primary: becoming it for a generation ---------------------------------------------

    async def _primary(self, volume: str, index: int, gen: int) -> PrimaryExtent:
        if not self.alive():
            raise Unavailable("this chunk server cannot prove its lease is alive")
        entry = self.emap.entry(volume, index)
        if entry is None or entry.record.gen < gen:
            await self.emap.wait_newer(volume, index, gen, 2.0)
            entry = self.emap.entry(volume, index)
        if entry is None:
            raise Unavailable(f"extent {volume}/{index} is not in the map")
        rec = entry.record
        if rec.gen != gen:
            raise StaleMap(rec.gen)
        if rec.primary != self.node_id:
            raise StaleMap(rec.gen)
        if rec.converging:
            raise Unavailable(f"extent {volume}/{index} is converging after a failover")
        key = (volume, index)
        pe = self._primaries.get(key)
        if pe is not None and pe.gen == gen:
            return pe
        async with self._setup.setdefault(key, asyncio.Lock()):
            pe = self._primaries.get(key)
            if pe is not None and pe.gen == gen:
                return pe
            if pe is not None and pe.gen > gen:
                raise StaleMap(pe.gen)
            pe = await self._become_primary(rec)
            self._primaries[key] = pe
            return pe

    async def _become_primary(self, rec: ExtentRecord) -> PrimaryExtent:
        if self._lost_here(rec.volume, rec.index):
            raise Unavailable("our replica was lost with its data directory")
        try:
            replica = await self.store.open(rec.volume, rec.index)
        except ReplicaNotFound:
            if rec.origin and rec.gen == 1:
                # A clone's extent starts as a local copy of its origin (docs/snapshots.md).
                # Our own copy is missing, so no write was ever applied to any member.
                if not await clone_from_origin(self.replicas.call, self.node_id, rec):
                    raise Unavailable(f"cannot copy origin {rec.origin}/{rec.index}") from None
                replica = await self.store.open(rec.volume, rec.index)
            # (any gen: at gen 1 too the others may hold data, and an empty primary would
            # take their `out_of_order` answers for repeats and diverge from them)
            elif len(rec.replicas) > 1 and await self._secondaries_hold_data(rec):
                # Our copy vanished (a wiped or replaced disk): never start over empty while
                # the others hold the data; a failover (or rebuild) has to sort it out.
                why = "our replica is missing but the secondaries hold data"
                raise PrimaryReplicaLost(why) from None
            else:
                replica = await self.store.create(rec.volume, rec.index, rec.gen)
        if replica.generation < rec.gen:
            await replica.set_generation(rec.gen)
        elif replica.generation > rec.gen:
            raise Unavailable("our replica is newer than our map: the map lags")
        if replica.state == ReplicaState.STALE and rec.replicas == [self.node_id]:
            await self._resume_sole_copy(rec, replica)
        if replica.state != ReplicaState.CURRENT:
            raise Unavailable(f"our replica is {replica.state.name.lower()}")
        pe = PrimaryExtent(
            rec.volume,
            rec.index,
            rec.gen,
            list(rec.replicas),
            replica,
            replica.applied_seq + 1,
            copies=rec.copies,
        )
        pe.idle.set()
        failed = []
        for member in pe.members[1:]:
            if rec.origin:
                if not await clone_from_origin(self.replicas.call, member, rec):
                    failed.append(member)
            elif not await self._ensure_secondary(pe, member):
                failed.append(member)
        if failed:
            await self._remove(pe, failed)
        return pe

    async def _resume_sole_copy(self, rec: ExtentRecord, replica: Replica) -> None:
        """Make the extent's only copy current again after it lost its page cache.

        A power loss leaves a dirty replica STALE (its applied_seq cut back to what was
        durable) until it catches up from a current one. An extent with a single member (a
        1-replica volume) has no other copy to catch up from, and none can be newer: every
        write acknowledged as durable is in its durable prefix. So its checksums are made
        truthful (rescan) and it serves again; before this, such an extent stayed NOT READY
        for good (found by the kernel power-loss scenario, tests/kernel).
        """
        fixed = len(await replica.rescan()) if replica.needs_rescan else 0
        await replica.set_generation(rec.gen, state=ReplicaState.CURRENT)
        log.warning(
            "extent %s/%d: sole copy resumed after a lost page cache (%d blocks re-hashed)",
            rec.volume,
            rec.index,
            fixed,
        )

    async def _secondaries_hold_data(self, rec: ExtentRecord) -> bool:
        for member in rec.replicas[1:]:
            try:
                st = await self.replicas.call(
                    member, partial(GetState, volume=rec.volume, extent=rec.index)
                )
            except PeerError:
                if rec.gen > 1:
                    return True  # cannot tell: assume the worst
                continue  # a new extent's first write: the dead member is removed at its forward
            if st.ok and (st.fields["applied_seq"] > 0 or st.fields["mapped_blocks"] > 0):
                return True
            if not st.ok and st.status is not Status.NOT_FOUND and rec.gen > 1:
                return True
        return False

    async def _ensure_secondary(self, pe: PrimaryExtent, member: str) -> bool:
        """The secondary has a replica at our generation (created empty on first use)."""
        try:
            resp = await self.replicas.call(
                member, lambda i: Create(i, pe.volume, pe.index, pe.gen, 0)
            )
        except PeerError:
            return False
        return resp.status in (Status.OK, Status.EXISTS)

    # -- primary: ordered mutations --------------------------------------------------------

    def _admit(self, nexus: Nexus | None) -> None:
        """Under the extent's lock, before the seq: refuse a superseded login's write."""
        if nexus is not None and self.epochs is not None:
            self.epochs.admit(nexus)

    async def primary_write(
        self,
        volume: str,
        index: int,
        gen: int,
        offset: int,
        data: bytes,
        fua: bool,
        nexus: Nexus | None = None,
    ) -> int:
        return await self._ordered(
            volume,
            index,
            gen,
            nexus,
            lambda pe, seq: pe.replica.write(offset, data, seq=seq, gen=pe.gen, fua=fua),
            lambda i, g, seq: Write(i, volume, index, g, seq, offset, fua, data, nexus),
        )

    async def primary_unmap(
        self,
        volume: str,
        index: int,
        gen: int,
        offset: int,
        length: int,
        fua: bool,
        nexus: Nexus | None = None,
    ) -> int:
        return await self._ordered(
            volume,
            index,
            gen,
            nexus,
            lambda pe, seq: pe.replica.unmap(offset, length, seq=seq, gen=pe.gen, fua=fua),
            lambda i, g, seq: Unmap(i, volume, index, g, seq, offset, length, fua, nexus),
        )

    async def _ordered(
        self,
        volume: str,
        index: int,
        gen: int,
        nexus: Nexus | None,
        apply: Callable[[PrimaryExtent, int], Awaitable[None]],
        request: Callable[[int, int, int], Request],
    ) -> int:
        """One access mutation at the primary: fenced, copy-on-write first, given the next
        seq and applied locally under the extent's lock, forwarded, then settled.
        `request(id, gen, seq)` builds the forwarded request."""
        pe = await self._primary(volume, index, gen)
        async with pe.lock:
            if pe.gen != gen:
                raise StaleMap(pe.gen)
            self._admit(nexus)
            await self._preserve(pe)
            seq = pe.next_seq
            try:
                await apply(pe, seq)
            finally:
                # applied (its FUA flush may still have failed): the seq is used either way
                pe.next_seq = max(pe.next_seq, pe.replica.applied_seq + 1)
            g = pe.gen
            sends = self._forward(pe, lambda i: request(i, g, seq), seq)
        return await self._settle(pe, seq, sends)

    async def primary_preserve(self, volume: str, index: int, gen: int) -> None:
        """Copy the extent aside now if a snapshot froze its data (a clone is about to read
        or copy it: docs/snapshots.md)."""
        pe = await self._primary(volume, index, gen)
        async with pe.lock:
            if pe.gen != gen:
                raise StaleMap(pe.gen)
            await self._preserve(pe)

    async def _preserve(self, pe: PrimaryExtent) -> None:
        """Under the extent's lock, before a mutation: snapshot copy-on-write."""
        try:
            await preserve(self.emap, self.replicas.call, pe)
        except PreserveFailed as exc:
            raise Unavailable(str(exc)) from None

    async def primary_flush(self, volume: str, index: int, gen: int) -> None:
        pe = await self._primary(volume, index, gen)
        await pe.replica.flush()
        members = pe.members[1:]
        results = await asyncio.gather(
            *(self.replicas.call(m, lambda i: Flush(i, volume, index, pe.gen)) for m in members),
            return_exceptions=True,
        )
        failed = [m for m, r in zip(members, results, strict=True) if not _ok(r)]
        if failed:
            await self._remove(pe, failed)
        self._check_quorum(pe)

    def _forward(
        self,
        pe: PrimaryExtent,
        build: Callable[[int], Request],
        seq: int,
        joining_build: Callable[[int], Request] | None = None,
    ) -> list[tuple[str, asyncio.Task[Response]]]:
        """Start one forward per secondary, in seq order on each ordered connection (and to a
        joining member: `joining_build` when the primary copies blocks to it)."""
        sends = []
        for member in pe.members[1:]:
            task = asyncio.ensure_future(self.replicas.call(member, build))
            sends.append((member, task))
        if pe.joining is not None:
            task = asyncio.ensure_future(self.replicas.call(pe.joining, joining_build or build))
            sends.append((pe.joining, task))
        if sends:
            pe.idle.clear()
            pe.inflight += len(sends)
        return sends

    async def _settle(
        self,
        pe: PrimaryExtent,
        seq: int,
        sends: list[tuple[str, asyncio.Task[Response]]],
        quorum: bool = True,
    ) -> int:
        """Wait for the forwards of `seq`; remove members that failed. With `quorum`, refuse
        (Unavailable) when fewer members than min_replicas remain; a join's ordered copy
        does not: adding a member is how an extent gets back above min_replicas."""
        failed: list[str] = []
        try:
            for member, task in sends:
                try:
                    resp = await task
                except PeerError as exc:
                    log.warning("forward of seq %d to %s failed: %s", seq, member, exc)
                    self._failed(pe, member, failed)
                    continue
                if resp.ok:
                    continue
                if resp.status is Status.OUT_OF_ORDER and resp.fields.get("expected", 0) > seq:
                    continue  # a repeat: it was applied already
                log.warning("secondary %s refused seq %d: %s", member, seq, resp.status)
                self._failed(pe, member, failed)
        finally:
            pe.settle(len(sends))
        if failed:
            await self._remove(pe, failed)
        if quorum:
            self._check_quorum(pe)
        return seq

    @staticmethod
    def _failed(pe: PrimaryExtent, member: str, failed: list[str]) -> None:
        if member in pe.members:
            failed.append(member)
        elif member == pe.joining:
            pe.joining = None  # the join ends; the write stands without it

    def _check_quorum(self, pe: PrimaryExtent) -> None:
        # a volume made with fewer copies than min_replicas (e.g. 1) would otherwise refuse
        # every write: it needs all of its copies instead
        need = min(self.min_replicas, pe.copies) if pe.copies else self.min_replicas
        if len(pe.members) < need:
            raise Unavailable(f"{len(pe.members)} replicas left, {need} needed")
        if not self.alive():
            raise Unavailable("this chunk server cannot prove its lease is alive")

    # -- primary: removing failed secondaries ----------------------------------------------

    async def _remove(self, pe: PrimaryExtent, failed: list[str]) -> None:
        """Drop failed secondaries: gen + 1 in etcd, then on every remaining member.

        Holds the extent's lock (no new seq) and waits for every forward in flight to settle
        first, so every remaining member has applied every seq assigned so far: the writes
        waiting for their answers can then be acknowledged.
        """
        async with pe.lock:
            while True:
                failed = [m for m in failed if m in pe.members[1:]]
                if not failed:
                    return
                await pe.idle.wait()
                entry: Entry | None = await self.emap.fresh(pe.volume, pe.index)
                if entry is None or entry.record.gen != pe.gen:
                    # someone else changed the extent (a failover): we are no longer its primary
                    self._primaries.pop((pe.volume, pe.index), None)
                    raise Unavailable("the extent changed while removing a failed secondary")
                keep = [m for m in pe.members if m not in failed]
                new = dataclasses.replace(
                    entry.record, gen=pe.gen + 1, replicas=keep, converging=False
                )
                await self._lease_expiry(failed)
                committed = await self.emap.replace(entry, new)
                if committed is None:
                    continue
                log.warning(
                    "extent %s/%d: removed %s, gen %d", pe.volume, pe.index, failed, new.gen
                )
                MEMBERS_REMOVED.inc(len(failed))
                EVENTS.emit("replica_removed", f"{pe.volume}/{pe.index}", ", ".join(failed))
                await pe.replica.set_generation(new.gen)
                pe.gen, pe.members = new.gen, keep
                pe.joining = None  # a join in progress restarts for the new generation
                # The remaining secondaries adopt the new generation: from now on they refuse
                # the removed member's and any older access point's requests.
                again = []
                set_gen = partial(SetGen, volume=pe.volume, extent=pe.index, gen=new.gen)

                for member in keep[1:]:
                    try:
                        resp = await self.replicas.call(member, set_gen)
                    except PeerError:
                        again.append(member)
                        continue
                    if not resp.ok:
                        again.append(member)
                failed = again


def _ok(r: object) -> bool:
    return isinstance(r, Response) and r.ok


# -- the server --------------------------------------------------------------------------------


class _Protocol(asyncio.Protocol):
    def __init__(self, server: DataServer) -> None:
        self._server = server
        self._conn = ServerConnection(server.secret, server.node_id)
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._flush_scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop: not an asyncio.Transport
        self._server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        for req in self._conn.receive_data(data):
            task = loop.create_task(self._serve(req))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._flush()
        if self._conn.closed:
            self.close()

    async def _serve(self, req: Request) -> None:
        try:
            peer = self._conn.peer
            if isinstance(req, Ping) and peer is not None and not self._server.node.grant(peer):
                refusal = "this chunk server cannot prove its lease is alive"
                self._conn.send_response(Response(req.id, Status.UNAVAILABLE, {"message": refusal}))
                self._flush()
                return
            resp = await self._server.node.handle(req)
        except Exception as exc:  # a bug must not leave the request unanswered
            log.exception("data request %s failed", req.OP)
            msg = clip_message(f"internal error: {exc}")
            resp = Response(req.id, Status.UNAVAILABLE, {"message": msg})
        if self._transport is None or self._transport.is_closing():
            return
        self._conn.send_response(resp)
        # Answers completed in the same loop iteration leave in one write.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._conn.data_to_send()
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        for task in list(self._tasks):
            task.cancel()

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


class DataServer:
    """The data port (`data_listen`): authenticated with the cluster secret."""

    def __init__(self, node: DataNode, secret: bytes, node_id: str) -> None:
        self.node = node
        self.secret = secret
        self.node_id = node_id
        self.connections: set[_Protocol] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Protocol(self), host, port, reuse_address=True
        )
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()


__all__ = [
    "DataNode",
    "DataServer",
    "PrimaryReplicaLost",
    "Replicas",
    "StaleMap",
    "Unavailable",
]
