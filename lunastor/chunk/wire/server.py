"""The data port: the one server of the chunk-to-chunk data protocol.

Production (`lunastor.chunk.service`, over a `DataNode`), the bare server process
(`lunastor.chunk.wire.peer_serve`, over a plain `DataService`), the benchmarks and the tests all
run this class. The protocol state lives in the sans-IO `ServerConnection`; this module only
moves bytes and starts handlers.

Concurrency and back-pressure (docs/data-protocol.md, "Transport", states the same rule):

* Every request is started as soon as it is parsed, in arrival order, and handled
  concurrently: an access point's pipelined writes to one primary do not wait for each other,
  while ordered mutations (forwarded writes, unmaps, ordered copies) reach their replica's FIFO
  lock in arrival order, i.e. `seq` order.
* A request the service can answer without waiting (`handle_now`: a forwarded write to an
  open replica whose ordering lock is free) is answered in the receive callback itself, with
  no Task — unless an ordered mutation of the same connection is still in a Task, which it
  must not overtake. One the service can start without a Task (`handle_soon`: a member's
  flush of an open replica) is answered from the callback that completes it.
* A connection stops reading its socket while `MAX_INFLIGHT` requests of it are unanswered, or
  while its transport's write buffer is above the high-water mark (a peer that does not read
  its answers), and reads again once both are back under the limit (half of `MAX_INFLIGHT`).
  So memory per connection is bounded by `MAX_INFLIGHT` requests plus one read.
* Answers completed in one loop iteration leave in one `writelines`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from lunastor.chunk.wire.messages import (
    MAX_PAYLOAD,
    Advance,
    Copy,
    Create,
    Delete,
    Ping,
    Request,
    Response,
    SetGen,
    Status,
    Unmap,
    Write,
    internal_error,
)
from lunastor.chunk.wire.session import ServerConnection
from lunastor.common.logs import get_logger

log = get_logger(component="data-server")

MAX_INFLIGHT = 64  # unanswered requests per connection before it stops reading
# requests a replica applies in arrival order: none may overtake another on its connection
ORDERED = (Write, Unmap, Copy, Advance, SetGen, Create, Delete)


class Service(Protocol):
    """What the server serves: `DataService` (replication/replicas.py) and `DataNode`."""

    async def handle(self, req: Request) -> Response: ...

    def handle_now(self, req: Request) -> Response | None:
        """The answer if it can be given without waiting (else None: `handle` it)."""
        ...

    def handle_soon(self, req: Request, answer: Callable[[Response], None]) -> bool:
        """Start `req` without a Task, its answer to `answer` later (else False: `handle`
        it)."""
        ...

    def grant(self, peer: str) -> bool:
        """A peer pinged us: may it hold a read lease from us (docs/datapath.md)?"""
        ...


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self, server: DataServer) -> None:
        self._server = server
        self._conn = ServerConnection(server.secret, server.node_id, max_payload=server.max_payload)
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ordered: set[asyncio.Task[None]] = set()  # those serving an ordered mutation
        self._soon = 0  # requests started by `handle_soon`, not answered yet
        self._flush_scheduled = False
        self._write_blocked = False
        self._reading = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # not `isinstance(transport, asyncio.Transport)`: uvloop's transports are not registered
        # as one, and the daemons run on uvloop
        self._transport = transport  # type: ignore[assignment]
        self._server.connections.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        # the socket reads straight into the frame reader: a payload lands once, in its own
        # buffer (messages.FrameReader)
        return self._conn.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        service = self._server.service
        for req in self._conn.buffer_updated(nbytes):
            # at once, when it needs no waiting and no ordered mutation of this connection
            # is still in a task (it must not be overtaken)
            if not self._ordered:
                try:
                    resp = service.handle_now(req)
                except Exception as exc:  # a bug must cost one answer, not the connection
                    resp = _failed(req, exc)
                if resp is not None:
                    self._conn.send_response(resp)
                    continue
            if not isinstance(req, ORDERED) and self._start_soon(service, req):
                continue
            # (the loop looked up only here: in 3.11 that costs a getpid() system call)
            task = asyncio.get_running_loop().create_task(self._serve(req))
            self._tasks.add(task)
            if isinstance(req, ORDERED):
                self._ordered.add(task)
            task.add_done_callback(self._done)
        self._flush()
        if self._conn.closed:
            self.close()
        else:
            self._pace()

    def _start_soon(self, service: Service, req: Request) -> bool:
        try:
            started = service.handle_soon(req, self._answered_soon)
        except Exception as exc:  # a bug must cost one answer, not the connection
            self._conn.send_response(_failed(req, exc))
            return True
        if started:
            self._soon += 1
        return started

    def _answered_soon(self, resp: Response) -> None:
        self._soon -= 1
        self._answer(resp)
        self._pace()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._ordered.discard(task)
        self._pace()

    def _pace(self) -> None:
        """The one back-pressure rule (module docstring)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._reading:
            if self._write_blocked or len(self._tasks) + self._soon >= MAX_INFLIGHT:
                transport.pause_reading()
                self._reading = False
        elif not self._write_blocked and len(self._tasks) + self._soon <= MAX_INFLIGHT // 2:
            transport.resume_reading()
            self._reading = True

    def pause_writing(self) -> None:
        self._write_blocked = True
        self._pace()

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._pace()

    async def _serve(self, req: Request) -> None:
        service = self._server.service
        try:
            peer = self._conn.peer
            if isinstance(req, Ping) and peer is not None and not service.grant(peer):
                refusal = "this chunk server cannot prove its lease is alive"
                resp = Response(req.id, Status.UNAVAILABLE, {"message": refusal})
            else:
                resp = await service.handle(req)
        except Exception as exc:  # a bug must cost one answer, not the connection
            resp = _failed(req, exc)
        self._answer(resp)

    def _answer(self, resp: Response) -> None:
        """An answer completed after the receive callback (a Task's, a `handle_soon`'s)."""
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
    """Serves the data protocol (`data_listen`), authenticated with the cluster secret, in
    front of a `Service` (a chunk server's `DataNode`, or a bare extent store's
    `DataService`)."""

    def __init__(
        self,
        service: Service,
        secret: bytes,
        node_id: str,
        *,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self.service = service
        self.secret = secret
        self.node_id = node_id
        self.max_payload = max_payload
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


__all__ = ["MAX_INFLIGHT", "DataServer", "Service"]


def _failed(req: Request, exc: Exception) -> Response:
    """Serving `req` raised `exc` (a bug): logged with its traceback, answered UNAVAILABLE."""
    log.exception("data request failed", op=str(req.OP), id=req.id)
    return internal_error(req.id, exc)
