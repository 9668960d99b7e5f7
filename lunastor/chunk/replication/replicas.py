"""What a chunk server does with each data-protocol request: the extent store behind the wire.

No sockets here (wire/server.py moves the bytes): `DataService.handle(request) -> Response`, with
every store error mapped onto exactly one wire status (docs/data-protocol.md, "Answers").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from lunastor.chunk.stepped import Stepped
from lunastor.chunk.store import (
    ChecksumMismatch,
    DataDirFailed,
    ExtentStore,
    ExtentStoreError,
    GenerationMismatch,
    HeaderDamaged,
    InvalidRequest,
    OutOfOrder,
    Replica,
    ReplicaClosed,
    ReplicaExists,
    ReplicaNotCurrent,
    ReplicaNotFound,
    ReplicaState,
    SpaceExhausted,
    StaleGeneration,
)
from lunastor.chunk.wire.messages import (
    Advance,
    Clone,
    Copy,
    Create,
    Delete,
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
    internal_error,
)
from lunastor.common.logs import get_logger

log = get_logger(component="data-service")

Answer = Callable[[Response], None]


class DataService:
    def __init__(self, store: ExtentStore) -> None:
        self.store = store
        self._handlers: dict[type[Request], Callable[[Any], Awaitable[Response]]] = {
            Ping: self._ping,
            Create: self._create,
            Delete: self._delete,
            Write: self._write,
            Unmap: self._unmap,
            Read: self._read,
            Flush: self._flush,
            GetState: self._get_state,
            SetGen: self._set_gen,
            Copy: self._copy,
            Advance: self._advance,
            Clone: self._clone,
        }

    async def handle(self, req: Request) -> Response:
        handler = self._handlers.get(type(req))
        if handler is None:
            return _error(req.id, Status.BAD_REQUEST, f"{req.OP} is not a data request")
        try:
            return await handler(req)
        except ExtentStoreError as exc:
            return self._store_error(req.id, exc)

    def handle_now(self, req: Request) -> Response | None:
        """The answer to `req` computed without waiting, or None (then `handle` it). Only a
        replica-level write (`seq >= 1`, no FUA) to an open replica whose ordering lock is
        free: a secondary applies the primary's forwards in the data port's receive
        callback, with no Task per write (docs/datapath.md)."""
        if type(req) is not Write or req.seq == 0 or req.fua:
            return None
        replica = self.store.opened(req.volume, req.extent)
        if replica is None:
            return None
        try:
            if not replica.write_now(req.offset, req.data, seq=req.seq, gen=req.gen):
                return None
        except ExtentStoreError as exc:
            return self._store_error(req.id, exc)
        return Response(req.id, Status.OK, {"applied_seq": replica.applied_seq})

    def handle_soon(self, req: Request, answer: Answer) -> bool:
        """Start `req` without a Task, its answer handed to `answer` later, from a callback:
        True if started (else `handle` it). Only a member's `flush` of an open replica: its
        flush round starts here, in the data port's receive callback, and is answered from
        the round's completion (docs/datapath.md, "Write + flush at QD1")."""
        if type(req) is not Flush:
            return False
        replica = self.store.opened(req.volume, req.extent)
        if replica is None:
            return False
        _Flush(replica.flush(), self, req.id, answer).step()
        return True

    def _store_error(self, rid: int, exc: ExtentStoreError) -> Response:
        """The answer for a store error; a failed data directory is reported first."""
        if isinstance(exc, DataDirFailed):
            self.data_dir_failed(exc)
        return error_response(rid, exc)

    def grant(self, peer: str) -> bool:
        """A peer pinged us: grant it a read lease. A bare store grants always; `DataNode`
        only while it can prove its own etcd lease alive."""
        return True

    def data_dir_failed(self, exc: DataDirFailed) -> None:
        """A request met a failed data directory (the chunk server takes it out of service)."""

    async def _ping(self, req: Ping) -> Response:
        return Response(req.id, Status.OK)

    async def _create(self, req: Create) -> Response:
        await self.store.create(req.volume, req.extent, req.gen, ReplicaState(req.state))
        return Response(req.id, Status.OK)

    async def _delete(self, req: Delete) -> Response:
        replica = await self.store.open(req.volume, req.extent)
        if req.gen < replica.generation:
            raise StaleGeneration(replica.generation, req.gen)
        await replica.delete()
        return Response(req.id, Status.OK)

    async def _write(self, req: Write) -> Response:
        replica = await self.store.open(req.volume, req.extent)
        await replica.write(req.offset, req.data, seq=req.seq, gen=req.gen, fua=req.fua)
        return Response(req.id, Status.OK, {"applied_seq": replica.applied_seq})

    async def _unmap(self, req: Unmap) -> Response:
        replica = await self.store.open(req.volume, req.extent)
        await replica.unmap(req.offset, req.length, seq=req.seq, gen=req.gen, fua=req.fua)
        return Response(req.id, Status.OK, {"applied_seq": replica.applied_seq})

    async def _read(self, req: Read) -> Response:
        replica = await self._current(req.volume, req.extent, req.gen)
        if replica.state != ReplicaState.CURRENT:
            raise ReplicaNotCurrent(replica.state, "serve reads")
        if req.with_checksums:
            data, sums = await replica.read_for_copy(req.offset, req.length)
            return Response(req.id, Status.OK, {}, data + sums)
        return Response(req.id, Status.OK, {}, await replica.read(req.offset, req.length))

    async def _flush(self, req: Flush) -> Response:
        replica = await self.store.open(req.volume, req.extent)
        await replica.flush()
        return Response(req.id, Status.OK)

    async def _get_state(self, req: GetState) -> Response:
        replica = await self.store.open(req.volume, req.extent)
        sums = await replica.checksums() if req.with_checksums else b""
        fields = {
            "gen": replica.generation,
            "applied_seq": replica.applied_seq,
            "durable_seq": replica.durable_seq,
            "state": int(replica.state),
            "mapped_blocks": replica.mapped_blocks,
        }
        return Response(req.id, Status.OK, fields, sums)

    async def _set_gen(self, req: SetGen) -> Response:
        replica = await self.store.open(req.volume, req.extent)
        state = None if req.state is None else ReplicaState(req.state)
        await replica.set_generation(req.gen, applied_seq=req.applied_seq, state=state)
        return Response(req.id, Status.OK, {"applied_seq": replica.applied_seq})

    async def _copy(self, req: Copy) -> Response:
        replica = await self._current(req.volume, req.extent, req.gen)
        if req.seq is None:
            ok = await replica.apply_copy(
                req.offset, req.data, req.checksums, if_applied=req.if_applied
            )
            if not ok and req.if_applied is not None:
                # a write landed since the sender read its copy, which would undo it
                raise OutOfOrder(req.if_applied + 1, replica.applied_seq + 1)
            return Response(req.id, Status.OK)
        await replica.apply_copy(req.offset, req.data, req.checksums, seq=req.seq, gen=req.gen)
        return Response(req.id, Status.OK)

    async def _advance(self, req: Advance) -> Response:
        replica = await self.store.open(req.volume, req.extent)
        await replica.advance(seq=req.seq, gen=req.gen)
        return Response(req.id, Status.OK, {"applied_seq": replica.applied_seq})

    async def _clone(self, req: Clone) -> Response:
        await self.store.clone(req.volume, req.extent, req.dst, req.gen)
        return Response(req.id, Status.OK)

    async def _current(self, volume: str, extent: int, gen: int) -> Replica:
        replica = await self.store.open(volume, extent)
        if gen != replica.generation:
            raise StaleGeneration(replica.generation, gen)
        return replica


class _Flush(Stepped[None]):
    """A member's flush round driven without a Task (`DataService.handle_soon`): the store's
    `Replica.flush` waits only on futures (its ordering lock, the thread pool's fdatasync)."""

    __slots__ = ("answer", "rid", "service")

    def __init__(
        self, coro: Coroutine[Any, Any, None], service: DataService, rid: int, answer: Answer
    ) -> None:
        super().__init__(coro)
        self.service = service
        self.rid = rid
        self.answer = answer

    def finished(self, result: None) -> None:
        self.answer(Response(self.rid, Status.OK))

    def failed(self, exc: BaseException, cancelled: bool) -> None:
        if isinstance(exc, ExtentStoreError):
            self.answer(self.service._store_error(self.rid, exc))
        else:  # a bug must cost one answer, not the connection
            log.error("flush failed: %r", exc)
            self.answer(internal_error(self.rid, exc))


def error_response(rid: int, exc: ExtentStoreError) -> Response:
    """The one wire status for each store error."""
    if isinstance(exc, GenerationMismatch):
        return _error(rid, Status.STALE_GENERATION, str(exc), gen=exc.current)
    if isinstance(exc, OutOfOrder):
        return _error(rid, Status.OUT_OF_ORDER, str(exc), expected=exc.expected)
    if isinstance(exc, ChecksumMismatch):
        return _error(rid, Status.CHECKSUM_MISMATCH, str(exc), blocks=exc.blocks)
    for kind, status in _SIMPLE:
        if isinstance(exc, kind):
            return _error(rid, status, str(exc))
    return _error(rid, Status.UNAVAILABLE, str(exc))


_SIMPLE: tuple[tuple[type[ExtentStoreError], Status], ...] = (
    (SpaceExhausted, Status.NO_SPACE),
    (ReplicaNotFound, Status.NOT_FOUND),
    (ReplicaClosed, Status.NOT_FOUND),
    (ReplicaExists, Status.EXISTS),
    (ReplicaNotCurrent, Status.NOT_CURRENT),
    (InvalidRequest, Status.BAD_REQUEST),
    (DataDirFailed, Status.UNAVAILABLE),
    (HeaderDamaged, Status.UNAVAILABLE),
)


def _error(rid: int, status: Status, message: str, **fields: Any) -> Response:
    return Response(rid, status, {**fields, "message": clip_message(message)})
