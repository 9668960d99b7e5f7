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
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from prometheus_client import Counter

from lunastor.chunk.data_service import DataService, error_response
from lunastor.chunk.extentmap import Entry, ExtentMap
from lunastor.chunk.peer import PeerClient, PeerError, PeerUnavailable
from lunastor.chunk.store import (
    ExtentStore,
    ExtentStoreError,
    Replica,
    ReplicaNotFound,
    ReplicaState,
)
from lunastor.chunk.wire import (
    Create,
    Flush,
    GetState,
    Ping,
    Read,
    Request,
    Response,
    SetGen,
    Status,
    Unmap,
    Write,
    clip_message,
)
from lunastor.chunk.wire_session import ServerConnection
from lunastor.common.records import ExtentRecord

log = logging.getLogger(__name__)

MEMBERS_REMOVED = Counter(
    "lunastor_replicas_removed_total", "Secondaries removed from an extent by its primary"
)


class Unavailable(Exception):
    """The primary cannot acknowledge now; the access point retries."""


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
    ) -> None:
        super().__init__(store)
        self.emap = emap
        self.replicas = replicas
        self.node_id = node_id
        self.alive = alive
        self.min_replicas = min_replicas
        # Read leases (docs/datapath.md, "Read leases"): a secondary serves reads of an extent
        # only while it holds a lease from the extent's primary, renewed by pinging it; the
        # primary removes a member only once any lease it granted that member has run out.
        self.read_lease = read_lease
        self._granted: dict[str, float] = {}  # peer -> when we last granted it (monotonic)
        self._leases: dict[str, float] = {}  # primary -> until when we hold its lease
        self._lease_task: asyncio.Task[None] | None = None
        self._primaries: dict[tuple[str, int], PrimaryExtent] = {}
        self._setup: dict[tuple[str, int], asyncio.Lock] = {}
        replicas.local = self

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
        try:
            if isinstance(req, Read) and self._sole_copy(req.volume, req.extent):
                # a read may come before any write since a restart: set the extent up as
                # its primary first, which resumes a copy that lost its page cache
                await self._primary(req.volume, req.extent, req.gen)
            if isinstance(req, Write) and req.seq == 0:
                seq = await self.primary_write(
                    req.volume, req.extent, req.gen, req.offset, req.data, req.fua
                )
                return Response(req.id, Status.OK, {"applied_seq": seq})
            if isinstance(req, Unmap) and req.seq == 0:
                seq = await self.primary_unmap(
                    req.volume, req.extent, req.gen, req.offset, req.length, req.fua
                )
                return Response(req.id, Status.OK, {"applied_seq": seq})
            if isinstance(req, Flush) and self._is_primary(req.volume, req.extent):
                await self.primary_flush(req.volume, req.extent, req.gen)
                return Response(req.id, Status.OK)
        except StaleMap as exc:
            msg = clip_message(str(exc))
            return Response(req.id, Status.STALE_GENERATION, {"gen": exc.gen, "message": msg})
        except Unavailable as exc:
            return Response(req.id, Status.UNAVAILABLE, {"message": clip_message(str(exc))})
        except ExtentStoreError as exc:
            return error_response(req.id, exc)
        return await super().handle(req)

    def _sole_copy(self, volume: str, index: int) -> bool:
        rec = self.emap.get(volume, index)
        return rec is not None and rec.replicas == [self.node_id]

    def _is_primary(self, volume: str, index: int) -> bool:
        rec = self.emap.get(volume, index)
        return rec is not None and rec.primary == self.node_id

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
        try:
            replica = await self.store.open(rec.volume, rec.index)
        except ReplicaNotFound:
            if rec.gen > 1 and await self._secondaries_hold_data(rec):
                # Our copy vanished (a wiped or replaced disk): never start over empty while
                # the others hold the data; a failover (or rebuild) has to sort it out.
                raise Unavailable("our replica is missing but the secondaries hold data") from None
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
            if not await self._ensure_secondary(pe, member):
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
                return True  # cannot tell: assume the worst
            if st.ok and (st.fields["applied_seq"] > 0 or st.fields["mapped_blocks"] > 0):
                return True
            if not st.ok and st.status is not Status.NOT_FOUND:
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

    async def primary_write(
        self, volume: str, index: int, gen: int, offset: int, data: bytes, fua: bool
    ) -> int:
        pe = await self._primary(volume, index, gen)
        async with pe.lock:
            if pe.gen != gen:
                raise StaleMap(pe.gen)
            seq = pe.next_seq
            await pe.replica.write(offset, data, seq=seq, gen=pe.gen, fua=fua)
            pe.next_seq += 1
            g = pe.gen

            def build(i: int) -> Request:
                return Write(i, volume, index, g, seq, offset, fua, data)

            sends = self._forward(pe, build, seq)
        return await self._settle(pe, seq, sends)

    async def primary_unmap(
        self, volume: str, index: int, gen: int, offset: int, length: int, fua: bool
    ) -> int:
        pe = await self._primary(volume, index, gen)
        async with pe.lock:
            if pe.gen != gen:
                raise StaleMap(pe.gen)
            seq = pe.next_seq
            await pe.replica.unmap(offset, length, seq=seq, gen=pe.gen, fua=fua)
            pe.next_seq += 1
            g = pe.gen

            def build(i: int) -> Request:
                return Unmap(i, volume, index, g, seq, offset, length, fua)

            sends = self._forward(pe, build, seq)
        return await self._settle(pe, seq, sends)

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
        self, pe: PrimaryExtent, build: Callable[[int], Request], seq: int
    ) -> list[tuple[str, asyncio.Task[Response]]]:
        """Start one forward per secondary, in seq order on each ordered connection."""
        sends = []
        for member in pe.members[1:]:
            task = asyncio.ensure_future(self.replicas.call(member, build))
            sends.append((member, task))
        if sends:
            pe.idle.clear()
            pe.inflight += len(sends)
        return sends

    async def _settle(
        self, pe: PrimaryExtent, seq: int, sends: list[tuple[str, asyncio.Task[Response]]]
    ) -> int:
        failed: list[str] = []
        try:
            for member, task in sends:
                try:
                    resp = await task
                except PeerError as exc:
                    log.warning("forward of seq %d to %s failed: %s", seq, member, exc)
                    failed.append(member)
                    continue
                if resp.ok:
                    continue
                if resp.status is Status.OUT_OF_ORDER and resp.fields.get("expected", 0) > seq:
                    continue  # a repeat: it was applied already
                log.warning("secondary %s refused seq %d: %s", member, seq, resp.status)
                failed.append(member)
        finally:
            pe.settle(len(sends))
        if failed:
            await self._remove(pe, failed)
        self._check_quorum(pe)
        return seq

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
                new = ExtentRecord(
                    volume=pe.volume,
                    index=pe.index,
                    gen=pe.gen + 1,
                    replicas=keep,
                    epoch=entry.record.epoch,
                    copies=entry.record.copies,
                )
                await self._lease_expiry(failed)
                committed = await self.emap.replace(entry, new)
                if committed is None:
                    continue
                log.warning(
                    "extent %s/%d: removed %s, gen %d", pe.volume, pe.index, failed, new.gen
                )
                MEMBERS_REMOVED.inc(len(failed))
                await pe.replica.set_generation(new.gen)
                pe.gen, pe.members = new.gen, keep
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
        self._flush()

    def _flush(self) -> None:
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


__all__ = ["DataNode", "DataServer", "Replicas", "StaleMap", "Unavailable"]
