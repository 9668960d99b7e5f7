"""The chunk server's data node: the extent store behind the data port, plus the primary's job
(order writes, forward them to the secondaries, remove a failed secondary). docs/datapath.md.

Wire conventions on top of docs/data-protocol.md (version 1 has no separate access ops):

* `write`/`unmap` with `seq = 0` is an **access write**: the sender (an access point) asks the
  extent's primary to order it. Replica-level writes always carry `seq >= 1` (a replica's
  first expected seq is 1), so the two never mix. The `ok` answer's `applied` is the seq the
  primary assigned.
* `caw` (always an access op) is compared with the primary's data under the extent's lock and,
  when equal, ordered and forwarded as a plain `write` of that seq; `miscompare` otherwise.
* `flush` received by the extent's primary flushes every replica of the extent; received by
  a secondary, only its own copy.
* `unavailable` from a primary: it cannot acknowledge now (below `min_replicas`, its own lease
  not provably alive, the extent converging after a failover): the access point retries.
* `stale_generation` from a primary: the sender's map is older (or newer) than the primary's.

The data port in front of it is `lunastor.chunk.wire.server.DataServer` (its concurrency and
back-pressure rule are stated there and in docs/data-protocol.md, "Transport").
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

from lunastor.chunk.replication.caw_tokens import CawTokens
from lunastor.chunk.replication.extentmap import Entry, ExtentMap
from lunastor.chunk.replication.fencing import EpochTable, Fenced
from lunastor.chunk.replication.replicas import Answer, DataService, error_response
from lunastor.chunk.replication.snapshots import PreserveFailed, clone_from_origin, due, preserve
from lunastor.chunk.store import (
    DataDirFailed,
    ExtentStore,
    ExtentStoreError,
    OrderingLock,
    Replica,
    ReplicaNotFound,
    ReplicaState,
)
from lunastor.chunk.wire.messages import (
    CompareAndWrite,
    Copy,
    Create,
    Delete,
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
from lunastor.chunk.wire.peer import OnAnswer, PeerClient, PeerError, PeerUnavailable
from lunastor.chunk.workers import WorkerSpec, owner
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


class Miscompared(Exception):
    """A `caw` whose verify data differs from the primary's data: nothing was written."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"miscompare at byte {offset} of the verify data")
        self.offset = offset


class StaleMap(Exception):
    """The sender's generation is not the primary's: refresh the map and retry."""

    def __init__(self, gen: int) -> None:
        super().__init__(f"extent generation is {gen}")
        self.gen = gen


# -- talking to replicas, local or remote ------------------------------------------------------


GONE_CONNECT_TIMEOUT = 0.5  # seconds to connect to a server without a live record


class Replicas:
    """One call interface to every chunk server's data node; our own is called in-process.

    A server of several workers (chunk/workers.py) is called at the worker that owns the
    request's extent; an extent of a sibling worker of ours goes over its data port."""

    def __init__(
        self,
        emap: ExtentMap,
        secret: bytes,
        node_id: str,
        worker: WorkerSpec | None = None,
        siblings: list[str] | None = None,
    ) -> None:
        """`worker`: our place among our server's workers; `siblings`: every worker's data
        address, by index (None for a server of one worker)."""
        self.emap = emap
        self.secret = secret
        self.node_id = node_id
        self.local: DataNode | None = None
        self.worker = worker if worker is not None and worker.count > 1 else None
        self.siblings = siblings or []
        self._clients: dict[tuple[str, int], tuple[str, PeerClient]] = {}
        # (peer, worker)s that answered no ping for a lease though live (DataNode._unanswered)
        self.silent: set[tuple[str, int]] = set()
        emap.on_gone.append(self.drop)

    def drop(self, chunk_id: str) -> None:
        """Break our connection to a chunk server whose live record vanished: requests waiting
        on it fail now (PeerUnavailable) rather than at their timeout, when it sits behind a
        cut link (the caller then fails it over; docs/faults.md)."""
        for key in [k for k in self._clients if k[0] == chunk_id]:
            self._clients.pop(key)[1].abort()

    def sever(self, chunk_id: str, worker: int = 0) -> None:
        """Break our connection to a live chunk server's worker that stopped answering:
        requests waiting on it fail now; the next call connects again."""
        known = self._clients.get((chunk_id, worker))
        if known is not None:
            known[1].abort()

    def workers(self, chunk_id: str) -> int:
        """How many workers the server runs (as its live record says)."""
        if chunk_id == self.node_id and self.worker is not None:
            return self.worker.count
        return max(1, len(self.emap.data_addresses(chunk_id)))

    def owner(self, chunk_id: str, volume: str) -> int:
        """The worker of `chunk_id` that owns the extents of store volume `volume`."""
        count = self.workers(chunk_id)
        return owner(volume, count) if count > 1 else 0

    def _route(self, chunk_id: str, build: Callable[[int], Request]) -> int | None:
        """Which worker of `chunk_id` gets the request; None: our own data node, in-process."""
        if chunk_id == self.node_id and self.worker is None:
            return None
        if chunk_id != self.node_id and len(self.emap.data_addresses(chunk_id)) <= 1:
            return 0
        volume = getattr(build(0), "volume", None)  # None: not about one extent (a ping)
        worker = self.owner(chunk_id, volume) if isinstance(volume, str) else 0
        if self.worker is not None and chunk_id == self.node_id:
            return None if volume is None or worker == self.worker.index else worker
        return worker

    def client(self, chunk_id: str, worker: int = 0) -> PeerClient:
        if chunk_id == self.node_id and self.siblings:
            address: str | None = self.siblings[worker]
        else:
            addresses = self.emap.data_addresses(chunk_id)
            address = addresses[worker] if worker < len(addresses) else None
        if address is None:
            raise PeerUnavailable(f"chunk server {chunk_id} has no known data address")
        key = (chunk_id, worker)
        known = self._clients.get(key)
        if known is not None and known[0] == address:
            return known[1]
        host, _, port = address.rpartition(":")
        client = PeerClient(
            host.strip("[]"), int(port), self.secret, self.node_id, request_timeout=20.0
        )
        self._clients[key] = (address, client)
        return client

    async def call(self, chunk_id: str, build: Callable[[int], Request]) -> Response:
        worker = self._route(chunk_id, build)
        if worker is None and self.local is not None:
            return await self.local.handle(build(0))
        # A server without a live record is dead, frozen or cut off, or (rarely) alive with
        # its lease just lost: connecting to it gets a short time, not the 5 s a slow but
        # live peer gets (a frozen process's kernel completes the TCP handshake and then
        # nothing answers; a cut link drops it), so that a primary forwarding to it fails
        # it, and removes it, at once (docs/faults.md). So does a live one that has answered
        # no ping for a lease: it is cut off from us (docs/faults.md, "Partitions").
        gone = (chunk_id, worker or 0) in self.silent or not self.emap.is_live(chunk_id)
        timeout = GONE_CONNECT_TIMEOUT if gone else None
        return await self.client(chunk_id, worker or 0).call(build, timeout)

    def start(self, chunk_id: str, build: Callable[[int], Request]) -> asyncio.Future[Response]:
        """`call` started now, its answer a future: on an open connection, the request is
        written in this call (so requests started in order leave in order) and no Task is
        made; PeerError is the future's exception."""
        worker = self._route(chunk_id, build)
        if worker is not None or self.local is None:
            try:
                fut = self.client(chunk_id, worker or 0).send_now(build)
            except PeerError as exc:
                fut = asyncio.get_running_loop().create_future()
                fut.set_exception(exc)
                return fut
            if fut is not None:
                return fut
        return asyncio.ensure_future(self.call(chunk_id, build))

    def start_to(self, chunk_id: str, build: Callable[[int], Request], on_answer: OnAnswer) -> None:
        """`start` with the answer handed to `on_answer` (a Response, or the PeerError): on
        an open connection from its receive callback, with no future and no Task (the
        primary's forwards); otherwise through `call`, in a Task."""
        worker = self._route(chunk_id, build)
        if worker is not None or self.local is None:
            try:
                if self.client(chunk_id, worker or 0).send_now_to(build, on_answer):
                    return
            except PeerError as exc:
                on_answer(exc)
                return
        asyncio.ensure_future(self.call(chunk_id, build)).add_done_callback(
            partial(_hand_on, on_answer)
        )

    async def close(self) -> None:
        for _, client in self._clients.values():
            await client.close()
        self._clients.clear()


def _hand_on(on_answer: OnAnswer, fut: asyncio.Future[Response]) -> None:
    """A `call` done: its answer (or failure) to `on_answer`."""
    if fut.cancelled():
        on_answer(PeerUnavailable("the request was cancelled"))
        return
    exc = fut.exception()
    if exc is None:
        on_answer(fut.result())
    elif isinstance(exc, PeerError):
        on_answer(exc)
    else:  # a bug: the forward counts as failed, the error is logged
        log.error("forward failed: %r", exc)
        on_answer(PeerUnavailable(f"internal error: {exc!r}"))


# -- the primary's per-extent state ------------------------------------------------------------


@dataclass
class PrimaryExtent:
    volume: str
    index: int
    gen: int
    members: list[str]  # members[0] is us
    replica: Replica
    next_seq: int
    # seq order; membership changes. FIFO and `busy` while anyone holds or awaits it: the
    # write fast path (DataNode.write_now) runs only when it is not, so it overtakes no one
    lock: OrderingLock = field(default_factory=OrderingLock)
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


class Settling:
    """One ordered mutation's forwards, settled from their answers as they arrive (called
    from the client's receive callback: no Task, no future per forward). When the last one
    has answered, the extent's in-flight count drops, members that failed are removed (a
    Task, only then), the quorum is checked, and `done` gets the seq or the refusal.

    It completes whether or not anyone still awaits `done` (an access point that went away
    cancels it): the accounting and the removal of failed members never depend on the
    caller, which is what the shielded Task per write used to guarantee."""

    __slots__ = ("count", "done", "failed", "node", "pe", "quorum", "seq", "waiting")

    def __init__(self, node: DataNode, pe: PrimaryExtent, seq: int, quorum: bool) -> None:
        self.node, self.pe, self.seq, self.quorum = node, pe, seq, quorum
        self.waiting = self.count = 0
        self.failed: list[str] = []
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def expect(self, n: int) -> None:
        """`n` more forwards are on their way (counted in the extent's in-flight)."""
        if n:
            self.pe.idle.clear()
            self.pe.inflight += n
            self.waiting += n
            self.count += n

    def answer(self, member: str, resp: Response | PeerError) -> None:
        pe, seq = self.pe, self.seq
        if isinstance(resp, PeerError):
            log.warning("forward of seq %d to %s failed: %s", seq, member, resp)
            DataNode._failed(pe, member, self.failed)
        elif not resp.ok and not (
            # a repeat: it was applied already
            resp.status is Status.OUT_OF_ORDER and resp.fields.get("expected", 0) > seq
        ):
            log.warning("secondary %s refused seq %d: %s", member, seq, resp.status)
            DataNode._failed(pe, member, self.failed)
        self.waiting -= 1
        if self.waiting == 0:
            self.finish()

    def answered(self, member: str, fut: asyncio.Future[Response]) -> None:
        """`answer` for a forward started as a future (`DataNode._forward`, join.py)."""
        _hand_on(partial(self.answer, member), fut)

    def finish(self) -> None:
        """Every forward answered (or none was sent)."""
        self.pe.settle(self.count)
        if self.failed:
            task = asyncio.ensure_future(self._remove())
            self.node._settling.add(task)
            task.add_done_callback(self.node._settling.discard)
            return
        self._conclude(None)

    async def _remove(self) -> None:
        try:
            await self.node._remove(self.pe, self.failed, f"a forward of seq {self.seq} failed")
        except Exception as exc:  # Unavailable (the extent changed), a failed store, a bug
            self._conclude(exc)
            return
        self._conclude(None)

    def _conclude(self, exc: BaseException | None) -> None:
        if exc is None and self.quorum:
            try:
                self.node._check_quorum(self.pe)
            except Unavailable as refused:
                exc = refused
        if self.done.done():
            return  # the caller went away (cancelled)
        if exc is None:
            self.done.set_result(self.seq)
        else:
            self.done.set_exception(exc)


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
        expected_back: Callable[[str], bool] | None = None,
    ) -> None:
        super().__init__(store)
        self.emap = emap
        # Whether a member is away on purpose and expected back (maintenance/restart.py): a
        # primary then refuses writes (the access point retries) rather than remove it.
        self.expected_back = expected_back
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
        # (primary, its worker) -> until when we hold that worker's lease (chunk/workers.py),
        # and the extent-map revision our map must have reached for it to count
        self._leases: dict[tuple[str, int], tuple[float, int]] = {}
        self._removing: dict[str, int] = {}  # member -> removals of it under way: no lease
        self._committed = 0  # the newest extent-map change we committed (our map may lag)
        # (peer, worker) -> its last answer to a ping (or our first ping of it; monotonic)
        self._answered: dict[tuple[str, int], float] = {}
        self._heard = 0.0  # when any peer last answered a ping (monotonic)
        self._lease_task: asyncio.Task[None] | None = None
        self._primaries: dict[tuple[str, int], PrimaryExtent] = {}
        self._setup: dict[tuple[str, int], asyncio.Lock] = {}
        # Replicas lost with a failed data directory (datadirs.py): never recreated empty
        # while the extent map still names us a member of their extent.
        self.lost: set[tuple[str, int]] = set()
        self.on_data_dir_failed: Callable[[DataDirFailed], None] | None = None
        # Makes the members of an extent we are primary of identical again, the most
        # advanced one first (`AccessPath.recover`): set by the data path; called when they
        # are found to differ as we become its primary (a whole cluster crashed mid-write).
        self.resume: Callable[[str, int], Awaitable[None]] | None = None
        self._resuming: dict[tuple[str, int], asyncio.Task[None]] = {}
        # the `caw` tokens our replicas applied, as primary or forwarded: a retried caw is
        # answered from them, here or at a member that takes over (caw_tokens.py)
        self.caw_tokens = CawTokens()
        self._settling: set[asyncio.Future[None]] = set()  # removals started by `Settling`
        replicas.local = self

    def data_dir_failed(self, exc: DataDirFailed) -> None:
        if self.on_data_dir_failed is not None:
            self.on_data_dir_failed(exc)

    def step_down(self, volume: str, index: int) -> None:
        """Forget our primary state for an extent (its replica was lost with its data dir)."""
        self._primaries.pop((volume, index), None)

    def lost_here(self, volume: str, index: int) -> bool:
        """Our replica of the extent was lost (`lost`), the map still names us, and no copy
        came back since: a join that added us again after we left copied it back, and
        refusing the next primary's Create as lost got that copy removed again (issue 12)."""
        if (volume, index) not in self.lost or self.store.has_replica(volume, index):
            return False
        rec = self.emap.get(volume, index)
        return rec is not None and self.node_id in rec.replicas

    # -- read leases -----------------------------------------------------------------------

    def start(self) -> None:
        self._lease_task = asyncio.create_task(self._renew_leases(), name="read leases")

    async def stop(self) -> None:
        if self._lease_task is not None:
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease_task

    def grant(self, peer: str) -> bool:
        """A peer pinged us: grant it a read lease, if we can still act as a primary and are
        not removing it from an extent (a lease granted while `_lease_expiry` waits would
        outlive the wait)."""
        if not self.alive() or self._removing.get(peer):
            return False
        self._granted[peer] = time.monotonic()
        return True

    async def _ping(self, req: Ping) -> Response:
        # The lease counts only once the holder's map has seen every extent-map change we
        # know of: a member we (or another primary) removed, cut off from etcd, still
        # believes it is one and would serve what it missed (docs/datapath.md, "Read leases").
        revision = max(self.emap.newest_change(), self._committed)
        return Response(req.id, Status.OK, {"revision": revision})

    async def _renew_leases(self) -> None:
        while True:
            peers = [s.id for s in self.emap.live_servers() if s.id != self.node_id]
            # each worker of a peer grants leases on the extents it is the primary of
            renewals = [(p, w) for p in peers for w in range(self.replicas.workers(p))]
            for gone in self._answered.keys() - set(renewals):  # its silence restarts when back
                del self._answered[gone]
                self.replicas.silent.discard(gone)
            await asyncio.gather(*(self._renew(p, w) for p, w in renewals))
            await asyncio.sleep(self.read_lease / 3)

    async def _renew(self, peer: str, worker: int = 0) -> None:
        sent = time.monotonic()  # the lease runs from before the grant: never past the promise
        since = self._answered.setdefault((peer, worker), sent)
        try:
            async with asyncio.timeout(self.read_lease / 2):
                resp = await self.replicas.client(peer, worker).ping()
        except (PeerError, TimeoutError):
            self._unanswered(peer, worker, since)
            return
        self._answered[(peer, worker)] = self._heard = time.monotonic()
        self.replicas.silent.discard((peer, worker))
        if resp.ok:
            revision = resp.fields.get("revision") or 0
            self._leases[(peer, worker)] = (sent + self.read_lease * 0.9, revision)

    def _unanswered(self, peer: str, worker: int, since: float) -> None:
        """A live peer that has answered no ping for a whole chunk lease (2 x `read_lease`) is
        cut off from us, though etcd still hears from it: treat it as if its live record had
        vanished. Our connection to it is broken (`Replicas.sever`), so the forwards waiting
        on it fail now, and reconnecting gets the short timeout of a gone server; its extents'
        primaries then remove it (docs/faults.md, "Partitions"), where every write of those
        extents stalled for the request timeout (20 s), and each later one for a 5 s connect.
        """
        now = time.monotonic()
        if now - since < 2 * self.read_lease:
            return
        # A stall of our own (an event loop starved on a loaded machine) silences every peer
        # at once; so does our own link going down. Only a peer that stays silent while
        # others answer us is cut off from us (with a single peer we cannot tell: we wait
        # for its lease or the request timeout, as before).
        if now - self._heard > self.read_lease:
            return
        if (peer, worker) not in self.replicas.silent:
            self.replicas.silent.add((peer, worker))
            log.warning(
                "chunk server %s (worker %d) answered no ping for %.1f s",
                peer,
                worker,
                2 * self.read_lease,
            )
        self.replicas.sever(peer, worker)

    def may_serve_read(self, volume: str, index: int) -> bool:
        if parse_preserved(volume) is not None:
            return True  # a snapshot's preserved copy is never written: every replica is current
        rec = self.emap.get(volume, index)
        if rec is None and not self.emap.loaded(volume):
            # no extent of its volume names us (pagewatch.py): a copy we were removed from
            return False
        if rec is None or rec.primary == self.node_id:
            return self.alive() or rec is None
        key = (rec.primary, self.replicas.owner(rec.primary, volume))
        until, revision = self._leases.get(key, (0.0, 0))
        # the grantor's changes reached us through this volume's own watch: another family's
        # stream being further ahead says nothing about this one (pagewatch.py)
        return time.monotonic() < until and self.emap.extents.family_revision(volume) >= revision

    async def _lease_expiry(self, members: list[str]) -> None:
        """Wait until no read lease we granted these members can still be running."""
        until = max((self._granted.get(m, 0.0) + self.read_lease for m in members), default=0.0)
        delay = until - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    def handle_now(self, req: Request) -> Response | None:
        # only forwarded writes (seq >= 1) are answered at once; see DataService.handle_now
        if type(req) is not Write or req.seq == 0:
            return None
        worker = self.replicas.worker
        if worker is not None and owner(req.volume, worker.count) != worker.index:
            return None  # a sibling worker's: handed over by `handle`
        resp = super().handle_now(req)
        if resp is not None and req.nexus and self.epochs is not None:
            self.epochs.note(req.nexus)  # forwarded: the primary accepted this epoch
        if resp is not None and req.token and resp.ok:
            self.caw_tokens.note(req.volume, req.extent, req.token, req.seq)
        return resp

    def handle_soon(self, req: Request, answer: Answer) -> bool:
        # a member's flush only (see DataService.handle_soon); the primary's runs its round
        # of the members (`primary_flush`), and a sibling worker's extent is handed over
        if type(req) is not Flush or self._is_primary(req.volume, req.extent):
            return False
        worker = self.replicas.worker
        if worker is not None and owner(req.volume, worker.count) != worker.index:
            return False
        return super().handle_soon(req, answer)

    async def handle(self, req: Request) -> Response:
        worker = self.replicas.worker
        if worker is not None:
            volume = getattr(req, "volume", None)
            if isinstance(volume, str) and owner(volume, worker.count) != worker.index:
                return await self._hand_over(req)
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
            and self.lost_here(req.volume, req.extent)
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
                settling = self.write_now(req)
                if settling is not None:
                    seq = await settling.done  # settles on its own if we are cancelled
                else:
                    seq = await asyncio.shield(
                        self.primary_write(
                            req.volume,
                            req.extent,
                            req.gen,
                            req.offset,
                            req.data,
                            req.fua,
                            req.nexus,
                        )
                    )
                return Response(req.id, Status.OK, {"applied_seq": seq})
            if isinstance(req, CompareAndWrite):
                seq = await asyncio.shield(self.primary_compare_and_write(req))
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
        except Miscompared as exc:
            return Response(req.id, Status.MISCOMPARE, {"offset": exc.offset})
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
        if isinstance(req, Copy | Create | Delete) or (
            isinstance(req, SetGen) and req.applied_seq is not None
        ):
            # rewritten from another member (or anew): it no longer holds what it applied
            self.caw_tokens.forget(req.volume, req.extent)
        resp = await super().handle(req)
        if type(req) is Write and req.token and resp.ok:  # a forwarded caw
            self.caw_tokens.note(req.volume, req.extent, req.token, req.seq)
        return resp

    async def _hand_over(self, req: Request) -> Response:
        """A request for a sibling worker's extent (a peer that does not know our workers, or
        a worker count changed since it read our live record): one local hop to its owner.
        Started before this task's first await, so ordered requests leave in arrival order."""
        try:
            resp = await self.replicas.start(self.node_id, lambda i: dataclasses.replace(req, id=i))
        except PeerError as exc:
            return Response(req.id, Status.UNAVAILABLE, {"message": clip_message(str(exc))})
        return dataclasses.replace(resp, id=req.id)

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

    async def remove_members(self, pe: PrimaryExtent, members: list[str], why: str) -> None:
        """Remove members (dead, or retired by a drain): gen + 1, as for a failed secondary.
        `why` is logged with the removal."""
        await self._remove(pe, members, why)

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
            if pe is not None and pe.gen < gen:
                # Our own change of its generation (a failed member removed, a join
                # committed) is in our map before `pe` adopts it: the change holds the
                # extent's lock until then. A second primary state set up meanwhile over
                # the same replica would give out seqs of its own, and the two collide
                # (our replica refused writes as out_of_order: MEDIUM ERROR at the
                # initiator when a secondary died under load). Wait for the change.
                async with pe.lock:
                    pass
                pe = self._primaries.get(key)
            if pe is not None and pe.gen == gen:
                return pe
            if pe is not None and pe.gen > gen:
                raise StaleMap(pe.gen)
            pe = await self._become_primary(rec)
            self._primaries[key] = pe
            return pe

    async def _become_primary(self, rec: ExtentRecord) -> PrimaryExtent:
        if self.lost_here(rec.volume, rec.index):
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
            await self._ahead_of_map(rec, replica.generation)
        if replica.state == ReplicaState.STALE and rec.replicas == [self.node_id]:
            await self._resume_sole_copy(rec, replica)
        if replica.state != ReplicaState.CURRENT:
            if replica.state == ReplicaState.STALE and not rec.origin:
                self._resume_later(rec.volume, rec.index)  # lost its page cache: converge now
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
        reasons: list[str] = []
        for member in pe.members[1:]:
            if rec.origin:
                if not await clone_from_origin(self.replicas.call, member, rec):
                    failed.append(member)
                    reasons.append(f"{member}: no clone of the origin")
            elif (refused := await self._ensure_secondary(pe, member)) is not None:
                failed.append(member)
                reasons.append(f"{member}: no replica at gen {pe.gen}: {refused}")
        away = [m for m in failed if self.away(m)]
        if away:
            raise Unavailable(f"{', '.join(away)} restarting: waited for, not removed")
        if not rec.origin and self.resume is not None:
            differ = await self._diverged(pe, failed)
            if differ:
                self._resume_later(rec.volume, rec.index)
                raise Unavailable(f"{', '.join(differ)} differ from us: converging them first")
        if failed:
            await self._remove(pe, failed, "; ".join(reasons))
        return pe

    async def _diverged(self, pe: PrimaryExtent, failed: list[str]) -> list[str]:
        """The members of our generation whose replica is not where ours is. Each write is
        applied here before it is forwarded, so a whole cluster that crashed mid-write may
        leave a member one (unacknowledged) write behind, and a power loss leaves members
        STALE: a forward would find it out of order and remove it, so they are converged
        instead, before any write (docs/faults.md, "Planned restarts")."""
        members = [m for m in pe.members[1:] if m not in failed]
        build = partial(GetState, volume=pe.volume, extent=pe.index)
        answers = await asyncio.gather(
            *(self.replicas.call(m, build) for m in members), return_exceptions=True
        )
        out = []
        for member, st in zip(members, answers, strict=True):
            if not isinstance(st, Response) or not st.ok:
                continue  # no answer: a forward will find out
            if st.fields["gen"] != pe.gen:
                # Ahead: a hand-over's gen + 1 never committed; behind: a change committed
                # without it being told (a join's push cut short by a stop). Either refuses
                # our forwards and would be removed: converged instead (`_ahead_of_map`).
                if st.fields["gen"] <= pe.gen + 1:
                    out.append(member)
                continue
            if st.fields["applied_seq"] != pe.next_seq - 1 or st.fields["state"] != 0:
                out.append(member)
        return out

    async def _ahead_of_map(self, rec: ExtentRecord, generation: int) -> None:
        """Our replica is at a generation the map does not have. Either our map lags (etcd
        has it: wait for our watch), or a hand-over (locality.hand_over: every member adopts
        gen + 1, then the commit) stopped before its commit: a clean stop whose commit met
        etcd already stopped, as in a whole-cluster `docker compose restart`. Nobody commits
        that gen + 1 any more, and every member at it refuses requests of the map's
        generation, so the extent stayed NOT READY for good. Instead the members are
        converged under a new committed generation (`resume`: every forward had settled
        before the hand-over, so they are equal and nothing is copied). Always raises
        Unavailable (the access point retries)."""
        fresh = await self.emap.fresh(rec.volume, rec.index)
        if fresh is not None and fresh.record.gen >= generation:
            raise Unavailable("our replica is newer than our map: the map lags")
        if fresh is not None and fresh.record.primary == self.node_id and not rec.origin:
            self._resume_later(rec.volume, rec.index)
            raise Unavailable(
                f"our replica is at gen {generation}, the map at {rec.gen}: converging"
            )
        raise Unavailable("our replica is newer than our map")

    def _resume_later(self, volume: str, index: int) -> None:
        key = (volume, index)
        if key in self._resuming or self.resume is None:
            return
        task = asyncio.ensure_future(self.resume(volume, index))
        self._resuming[key] = task

        def done(t: asyncio.Task[None]) -> None:
            self._resuming.pop(key, None)
            if not t.cancelled() and t.exception() is not None:
                log.warning("converging %s/%d failed: %r", volume, index, t.exception())

        task.add_done_callback(done)

    def away(self, member: str) -> bool:
        """Whether `member` is away on purpose and expected back (restart.py)."""
        return self.expected_back is not None and self.expected_back(member)

    def _members_back(self, pe: PrimaryExtent) -> None:
        """Before a seq is given out: every member must be able to take it. One away on
        purpose (a planned restart) is waited for: the write is refused now and retried by
        the access point, instead of acknowledged without it and the member removed."""
        if self.expected_back is None:
            return
        away = [m for m in pe.members[1:] if self.expected_back(m)]
        if away:
            raise Unavailable(f"{', '.join(away)} restarting: writes wait for it")

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

    async def _ensure_secondary(self, pe: PrimaryExtent, member: str) -> str | None:
        """The secondary has a replica at our generation (created empty on first use);
        otherwise returns why not."""
        try:
            resp = await self.replicas.call(
                member, lambda i: Create(i, pe.volume, pe.index, pe.gen, 0)
            )
        except PeerError as exc:
            return str(exc)
        if resp.status in (Status.OK, Status.EXISTS):
            return None
        return f"{resp.status.name} {resp.fields}"

    # -- primary: ordered mutations --------------------------------------------------------

    def _admit(self, nexus: Nexus | None) -> None:
        """Under the extent's lock, before the seq: refuse a superseded login's write."""
        if nexus is not None and self.epochs is not None:
            self.epochs.admit(nexus)

    def write_now(self, req: Write) -> Settling | None:
        """An access write's ordered part done at once, without a Task (the hot path,
        docs/datapath.md): when we hold the extent's primary state at the request's
        generation, nobody holds or awaits its lock, no FUA, no snapshot copy due and the
        replica applies it without waiting, this assigns the seq, applies it locally and
        writes the forwards in this call, as `_ordered` would under the lock (no await
        between the checks and the forwards, so nothing can interleave). Returns the
        forwards' `Settling`, or None (nothing done): `primary_write` then takes the full
        path. Raises what `_ordered` raises before a seq is used (Fenced, Unavailable)."""
        if req.fua or not self.alive():
            return None
        pe = self._primaries.get((req.volume, req.extent))
        if pe is None or pe.gen != req.gen or pe.lock.busy:
            return None
        entry = self.emap.entry(req.volume, req.extent)
        if entry is None:
            return None
        rec = entry.record
        if rec.gen != pe.gen or rec.primary != self.node_id or rec.converging:
            return None  # `_primary` refuses or waits for the map
        self._admit(req.nexus)
        self._members_back(pe)
        if due(self.emap, pe, entry) is not None:
            return None  # a snapshot's copy-on-write first (it waits for the forwards)
        seq = pe.next_seq
        try:
            if not pe.replica.write_now(req.offset, req.data, seq=seq, gen=pe.gen):
                return None
        finally:
            pe.next_seq = max(pe.next_seq, pe.replica.applied_seq + 1)
        volume, index, gen, offset, data, nexus = (
            req.volume,
            req.extent,
            pe.gen,
            req.offset,
            req.data,
            req.nexus,
        )
        return self._forward_to(
            pe, lambda i: Write(i, volume, index, gen, seq, offset, False, data, nexus), seq
        )

    async def primary_write(
        self,
        volume: str,
        index: int,
        gen: int,
        offset: int,
        data: bytes | bytearray | memoryview,
        fua: bool,
        nexus: Nexus | None = None,
    ) -> int:
        return await self._ordered(
            volume,
            index,
            gen,
            nexus,
            lambda pe, seq: pe.replica.write(offset, data, seq=seq, gen=pe.gen, fua=False),
            lambda i, g, seq: Write(i, volume, index, g, seq, offset, fua, data, nexus),
            fua,
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
            lambda pe, seq: pe.replica.unmap(offset, length, seq=seq, gen=pe.gen, fua=False),
            lambda i, g, seq: Unmap(i, volume, index, g, seq, offset, length, fua, nexus),
            fua,
        )

    async def primary_compare_and_write(self, req: CompareAndWrite) -> int:
        """COMPARE AND WRITE inside the extent's ordering: compared with our own copy under
        the extent's lock, where every write ordered before it is applied and none after it
        can be, then written and forwarded as an ordinary write of the next seq (fenced the
        same way). Raises Miscompared (nothing written, no seq used) when it differs."""
        offset, verify, data, token = req.offset, req.verify, req.data, req.token
        volume, index, nexus, fua = req.volume, req.extent, req.nexus, req.fua

        async def compare(pe: PrimaryExtent) -> int | None:
            # a retry of one our replica applied (as its primary, or forwarded by the
            # primary we took over from): its compare is done
            done = self.caw_tokens.seq(volume, index, token) if token else None
            if done is not None:
                return done
            current = await pe.replica.read(offset, len(verify))
            if current != verify:
                raise Miscompared(first_difference(current, verify))
            return None

        async def write(pe: PrimaryExtent, seq: int) -> None:
            await pe.replica.write(offset, data, seq=seq, gen=pe.gen, fua=False)
            if token:
                self.caw_tokens.note(volume, index, token, seq)

        return await self._ordered(
            volume,
            index,
            req.gen,
            nexus,
            write,
            # forwarded with its token: every member that applies it can answer a retry
            lambda i, g, seq: Write(i, volume, index, g, seq, offset, fua, data, nexus, token),
            fua,
            check=compare,
        )

    async def _ordered(
        self,
        volume: str,
        index: int,
        gen: int,
        nexus: Nexus | None,
        apply: Callable[[PrimaryExtent, int], Awaitable[None]],
        request: Callable[[int, int, int], Request],
        fua: bool = False,
        check: Callable[[PrimaryExtent], Awaitable[int | None]] | None = None,
    ) -> int:
        """One access mutation at the primary: fenced, checked (`check`, under the lock:
        its exception refuses the mutation before any seq is used; a seq it returns names a
        repeat of a mutation already applied, answered once every forward in flight has
        settled and the extent still has its quorum, so every member holds it), copy-on-write
        first, given the next seq and applied locally under the extent's lock, forwarded, then
        settled. `request(id, gen, seq)` builds the forwarded request. With `fua`, the local
        flush runs after the lock is released, beside the forwards (each secondary flushes
        its own before answering), and joins the replica's group flush (docs/datapath.md)."""
        pe = await self._primary(volume, index, gen)
        async with pe.lock:
            if pe.gen != gen:
                raise StaleMap(pe.gen)
            self._admit(nexus)
            self._members_back(pe)
            repeat = await check(pe) if check is not None else None
            if repeat is None:
                await self._preserve(pe)
                seq = pe.next_seq
                try:
                    await apply(pe, seq)
                finally:
                    # applied (its FUA flush may still have failed): the seq is used either way
                    pe.next_seq = max(pe.next_seq, pe.replica.applied_seq + 1)
                g = pe.gen
                settling = self._forward_to(pe, lambda i: request(i, g, seq), seq)
        if repeat is not None:
            await pe.idle.wait()  # its own forwards too, if the first try is still settling
            if not self.current(pe):
                raise Unavailable("the extent changed while answering a repeat")
            self._check_quorum(pe)
            if fua:
                await pe.replica.flush()
            return repeat
        if not fua:
            return await settling.done
        flushed = asyncio.ensure_future(pe.replica.flush())
        try:
            await settling.done
        finally:
            await flushed  # its error (a failed data directory) fails the write
        return seq

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
        """SYNCHRONIZE CACHE for one extent: every member flushes, all at once (the local
        flush joins the replica's group flush; docs/datapath.md)."""
        pe = await self._primary(volume, index, gen)
        self._members_back(pe)
        members = pe.members[1:]
        # the members' flushes are written now (futures, no Task each) and sync beside ours
        sends = [self.replicas.start(m, lambda i: Flush(i, volume, index, pe.gen)) for m in members]
        try:
            await pe.replica.flush()
        finally:
            results = await asyncio.gather(*sends, return_exceptions=True)
        failed = [m for m, r in zip(members, results, strict=True) if not _ok(r)]
        if failed:
            await self._remove(pe, failed, "its flush failed")
        self._check_quorum(pe)

    def _forward_to(self, pe: PrimaryExtent, build: Callable[[int], Request], seq: int) -> Settling:
        """Start one forward per secondary (and to a joining member), in seq order on each
        ordered connection, settled by their answers (`Settling`): on a connection that is
        up a forward is written at once, its answer handled in the receive callback."""
        settling = Settling(self, pe, seq, quorum=True)
        targets = pe.members[1:] if pe.joining is None else [*pe.members[1:], pe.joining]
        settling.expect(len(targets))
        for member in targets:
            self.replicas.start_to(member, build, partial(settling.answer, member))
        if not targets:
            settling.finish()
        return settling

    def _forward(
        self,
        pe: PrimaryExtent,
        build: Callable[[int], Request],
        seq: int,
        joining_build: Callable[[int], Request] | None = None,
    ) -> list[tuple[str, asyncio.Future[Response]]]:
        """Start one forward per secondary, in seq order on each ordered connection (and to a
        joining member: `joining_build` when the primary copies blocks to it). On a
        connection that is up, a forward is written at once and is only a future."""
        sends = []
        for member in pe.members[1:]:
            sends.append((member, self.replicas.start(member, build)))
        if pe.joining is not None:
            sends.append((pe.joining, self.replicas.start(pe.joining, joining_build or build)))
        if sends:
            pe.idle.clear()
            pe.inflight += len(sends)
        return sends

    async def _settle(
        self,
        pe: PrimaryExtent,
        seq: int,
        sends: list[tuple[str, asyncio.Future[Response]]],
        quorum: bool = True,
    ) -> int:
        """Wait for the forwards of `seq` (started by `_forward`, counted in flight there);
        remove members that failed. With `quorum`, refuse (Unavailable) when fewer members
        than min_replicas remain; a join's ordered copy does not: adding a member is how an
        extent gets back above min_replicas. The rule is `Settling`'s."""
        settling = Settling(self, pe, seq, quorum)
        settling.waiting = settling.count = len(sends)
        for member, fut in sends:
            fut.add_done_callback(partial(settling.answered, member))
        if not sends:
            settling.finish()
        return await settling.done

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

    async def _remove(self, pe: PrimaryExtent, failed: list[str], why: str) -> None:
        """Drop failed secondaries: gen + 1 in etcd, then on every remaining member. `why`
        (logged): a removed member comes back only by a copy, so the operator is told.

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
                for m in failed:
                    self._removing[m] = self._removing.get(m, 0) + 1
                try:
                    await self._lease_expiry(failed)
                    committed = await self.emap.replace(entry, new)
                    if committed is not None:
                        self._committed = max(self._committed, committed.mod_revision)
                finally:
                    for m in failed:
                        self._removing[m] -= 1
                if committed is None:
                    continue
                log.warning(
                    "extent %s/%d: removed %s (%s), gen %d",
                    pe.volume,
                    pe.index,
                    failed,
                    why,
                    new.gen,
                )
                MEMBERS_REMOVED.inc(len(failed))
                detail = f"{', '.join(failed)}: {why}"
                EVENTS.emit("replica_removed", f"{pe.volume}/{pe.index}", detail)
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
                failed, why = again, f"it did not take gen {new.gen}"


def _ok(r: object) -> bool:
    return isinstance(r, Response) and r.ok


def first_difference(a: bytes, b: bytes) -> int:
    """The offset of the first byte where `a` and `b` (of equal length) differ."""
    if a == b:
        raise ValueError("the two are equal")
    lo, hi = 0, len(a)  # bisect on slices: C-speed compares, not a Python loop per byte
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return lo


__all__ = [
    "DataNode",
    "Miscompared",
    "PrimaryReplicaLost",
    "Replicas",
    "StaleMap",
    "Unavailable",
]
