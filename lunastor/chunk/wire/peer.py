"""asyncio glue for the data protocol: a server in front of the extent store, and a client.

Layers as in asyncpg: the sans-IO state machines (`wire_session`) hold the protocol; the
`asyncio.Protocol` classes here only move bytes and complete futures; `PeerClient` adds
reconnection. Connections are persistent and pipelined (docs/data-protocol.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from lunastor.chunk.replication.replicas import DataService
from lunastor.chunk.wire.messages import (
    MAX_PAYLOAD,
    AuthFailed,
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
    WireError,
    Write,
    clip_message,
)
from lunastor.chunk.wire.session import ClientConnection, ServerConnection
from lunastor.common.logs import get_logger

log = get_logger(component="peer")

MAX_QUEUED = 64  # requests read ahead per connection before we stop reading the socket


class PeerError(Exception):
    """A request could not be answered by the peer (not: the peer answered an error)."""


class PeerUnavailable(PeerError):
    """No connection (refused, reset, closed): retry, on this peer or another."""


class PeerAuthFailed(PeerError):
    """The handshake failed: one side does not know the cluster secret."""


# -- server -----------------------------------------------------------------------------------


class _ServerProtocol(asyncio.Protocol):
    def __init__(self, server: PeerServer) -> None:
        self._server = server
        self._conn = ServerConnection(server.secret, server.node, max_payload=server.max_payload)
        self._queue: asyncio.Queue[Request] = asyncio.Queue()
        self._transport: asyncio.Transport | None = None
        self._worker: asyncio.Task[None] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._reading = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # not `isinstance(transport, asyncio.Transport)`: uvloop's transports are not registered
        # as one, and the daemons run on uvloop
        self._transport = transport  # type: ignore[assignment]
        self._server.connections.add(self)
        self._worker = asyncio.get_running_loop().create_task(self._work())

    def data_received(self, data: bytes) -> None:
        for req in self._conn.receive_data(data):
            self._queue.put_nowait(req)
        self._flush_out()
        if self._conn.closed:
            self.close()
        elif self._reading and self._queue.qsize() >= MAX_QUEUED:
            assert self._transport is not None
            self._transport.pause_reading()
            self._reading = False

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        if self._worker is not None:
            self._worker.cancel()

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    async def _work(self) -> None:
        # One request at a time, in arrival order: ordered mutations stay in seq order.
        while True:
            req = await self._queue.get()
            if not self._reading and self._queue.qsize() < MAX_QUEUED // 2:
                assert self._transport is not None
                self._transport.resume_reading()
                self._reading = True
            try:
                resp = await self._server.service.handle(req)
            except Exception as exc:  # a bug must cost one answer, not the connection
                log.exception("data request failed", op=str(req.OP), id=req.id)
                resp = Response(req.id, Status.UNAVAILABLE, {"message": clip_message(repr(exc))})
            await self._can_write.wait()
            self._conn.send_response(resp)
            self._flush_out()

    def _flush_out(self) -> None:
        out = self._conn.data_to_send()
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(out)


class PeerServer:
    """Serves the data protocol for one extent store."""

    def __init__(
        self, store_service: DataService, secret: bytes, node: str, max_payload: int = MAX_PAYLOAD
    ) -> None:
        self.service = store_service
        self.secret = secret
        self.node = node
        self.max_payload = max_payload
        self.connections: set[_ServerProtocol] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ServerProtocol(self), host, port)
        sock = self._server.sockets[0]
        addr = sock.getsockname()
        return str(addr[0]), int(addr[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()


# -- client -----------------------------------------------------------------------------------


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters: dict[int, asyncio.Future[Response]] = {}
        self.lost = False
        self._flush_scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.conn.start()
        self._flush_out()

    def data_received(self, data: bytes) -> None:
        try:
            responses = self.conn.receive_data(data)
        except AuthFailed as exc:
            self._fail(PeerAuthFailed(str(exc)))
            return
        except WireError as exc:
            self._fail(PeerUnavailable(f"protocol error from peer: {exc}"))
            return
        if self.conn.authenticated and not self.ready.done():
            self.ready.set_result(None)
        for resp in responses:
            fut = self.waiters.pop(resp.id, None)
            if fut is not None and not fut.done():
                fut.set_result(resp)
        self._flush_out()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(PeerUnavailable(f"connection lost: {exc or 'closed by peer'}"))

    def send(self, req: Request) -> asyncio.Future[Response]:
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.waiters[req.id] = fut
        self.conn.send_request(req)
        # Requests made in the same loop iteration (a pipelined burst) leave in one write.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_out)
        return fut

    def _flush_out(self) -> None:
        self._flush_scheduled = False
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def _fail(self, exc: PeerError) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()  # mark retrieved: callers may not be waiting on it
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(exc)
        self.waiters.clear()
        self.conn.fail_pending()
        if self.transport is not None:
            self.transport.close()


class PeerClient:
    """A persistent, pipelined, authenticated connection to one chunk server's data port.

    Connects lazily and again after a failure; requests in flight when a connection breaks
    fail with PeerUnavailable (the caller retries: see "Handling repeat calls").
    """

    def __init__(
        self,
        host: str,
        port: int,
        secret: bytes,
        node: str,
        *,
        connect_timeout: float = 5.0,
        request_timeout: float = 30.0,
    ) -> None:
        self.host, self.port = host, port
        self._secret, self._node = secret, node
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._proto: _ClientProtocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connection(self) -> _ClientProtocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            proto = self._proto
            if proto is not None and not proto.lost:
                return proto
            loop = asyncio.get_running_loop()
            conn = ClientConnection(self._secret, self._node)
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, proto = await loop.create_connection(
                        lambda: _ClientProtocol(conn), self.host, self.port
                    )
                    await proto.ready
            except OSError as exc:
                raise PeerUnavailable(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
            except TimeoutError:
                raise PeerUnavailable(f"timed out connecting to {self.host}:{self.port}") from None
            self._proto = proto
            return proto

    async def call(self, build: Callable[[int], Request]) -> Response:
        """Send `build(request_id)` and wait for its answer."""
        proto = await self._connection()
        fut = proto.send(build(proto.conn.next_id()))
        try:
            async with asyncio.timeout(self.request_timeout):
                return await fut
        except TimeoutError:
            raise PeerUnavailable(f"no answer from {self.host}:{self.port}") from None

    async def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()

    # -- one method per request ----------------------------------------------------------

    async def ping(self) -> Response:
        return await self.call(Ping)

    async def create(self, volume: str, extent: int, gen: int, state: int = 0) -> Response:
        return await self.call(lambda i: Create(i, volume, extent, gen, state))

    async def delete(self, volume: str, extent: int, gen: int) -> Response:
        return await self.call(lambda i: Delete(i, volume, extent, gen))

    async def write(
        self, volume: str, extent: int, gen: int, seq: int, offset: int, data: bytes, fua: bool
    ) -> Response:
        return await self.call(lambda i: Write(i, volume, extent, gen, seq, offset, fua, data))

    async def unmap(
        self, volume: str, extent: int, gen: int, seq: int, offset: int, length: int, fua: bool
    ) -> Response:
        return await self.call(lambda i: Unmap(i, volume, extent, gen, seq, offset, length, fua))

    async def read(
        self, volume: str, extent: int, gen: int, offset: int, length: int, **kw: Any
    ) -> Response:
        return await self.call(lambda i: Read(i, volume, extent, gen, offset, length, **kw))

    async def flush(self, volume: str, extent: int, gen: int) -> Response:
        return await self.call(lambda i: Flush(i, volume, extent, gen))

    async def get_state(self, volume: str, extent: int, with_checksums: bool = False) -> Response:
        return await self.call(lambda i: GetState(i, volume, extent, with_checksums))

    async def set_gen(self, volume: str, extent: int, gen: int, **kw: Any) -> Response:
        return await self.call(lambda i: SetGen(i, volume, extent, gen, **kw))

    async def copy(
        self, volume: str, extent: int, gen: int, offset: int, data: bytes, checksums: bytes
    ) -> Response:
        return await self.call(
            lambda i: Copy(i, volume, extent, gen, offset, len(data), data, checksums)
        )
