"""asyncio glue for the data protocol, the client side (the server is `server.py`).

Layers as in asyncpg: the sans-IO state machines (`session.py`) hold the protocol; the
`asyncio.Protocol` class here only moves bytes and completes futures; `PeerClient` adds
reconnection. Connections are persistent and pipelined (docs/data-protocol.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeAlias

from lunastor.chunk.wire.messages import (
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
    Unmap,
    WireError,
    Write,
)
from lunastor.chunk.wire.session import ClientConnection
from lunastor.common.logs import get_logger

log = get_logger(component="peer")


class PeerError(Exception):
    """A request could not be answered by the peer (not: the peer answered an error)."""


class PeerUnavailable(PeerError):
    """No connection (refused, reset, closed): retry, on this peer or another."""


class PeerAuthFailed(PeerError):
    """The handshake failed: one side does not know the cluster secret."""


# -- client -----------------------------------------------------------------------------------

# What a forward's answer is handed to, called from the receive callback itself: the answer,
# or the PeerError that ended the request (the primary's hot path: no future, no loop hop)
OnAnswer: TypeAlias = Callable[[Response | PeerError], None]
Waiter: TypeAlias = asyncio.Future[Response] | OnAnswer


class _ClientProtocol(asyncio.BufferedProtocol):
    def __init__(self, conn: ClientConnection, request_timeout: float = 30.0) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        # kept: asyncio.get_running_loop() costs a getpid() system call (CPython 3.11), and
        # every forward would ask
        self._loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = self._loop.create_future()
        # request id -> (its future or callback, when it was sent); in send order, so the
        # oldest is first
        self.waiters: dict[int, tuple[Waiter, float]] = {}
        self.lost = False
        self._flush_scheduled = False
        self.request_timeout = request_timeout
        self._deadline: asyncio.TimerHandle | None = None  # one timer for all requests

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.conn.start()
        self._flush_out()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            responses = self.conn.buffer_updated(nbytes)
        except AuthFailed as exc:
            self._fail(PeerAuthFailed(str(exc)))
            return
        except WireError as exc:
            self._fail(PeerUnavailable(f"protocol error from peer: {exc}"))
            return
        if self.conn.authenticated and not self.ready.done():
            self.ready.set_result(None)
        for resp in responses:
            waiter = self.waiters.pop(resp.id, None)
            if waiter is not None:
                _answer(waiter[0], resp)
        self._flush_out()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(PeerUnavailable(f"connection lost: {exc or 'closed by peer'}"))

    def send(self, req: Request) -> asyncio.Future[Response]:
        """Send `req`; its future gets the answer, or PeerUnavailable when the connection
        breaks or no answer came within `request_timeout`."""
        fut: asyncio.Future[Response] = self._loop.create_future()
        self.send_to(req, fut)
        return fut

    def send_to(self, req: Request, waiter: Waiter) -> None:
        """`send`, the answer (or the PeerUnavailable) going to `waiter`: a future, or a
        callback called from the receive callback (it must not raise)."""
        loop = self._loop
        self.waiters[req.id] = (waiter, loop.time())
        self.conn.send_request(req)
        # Requests made in the same loop iteration (a pipelined burst) leave in one write.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush_out)
        if self._deadline is None:
            self._deadline = loop.call_later(self.request_timeout, self._expire)

    def _expire(self) -> None:
        """The connection's one deadline timer: fail the requests older than the timeout,
        then sleep until the oldest one left would expire (none left: no timer)."""
        self._deadline = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.request_timeout
        for rid, (waiter, sent) in list(self.waiters.items()):
            if sent > cutoff:
                self._deadline = loop.call_at(sent + self.request_timeout, self._expire)
                return
            del self.waiters[rid]
            _answer(waiter, PeerUnavailable("no answer within the request timeout"))

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
        waiters, self.waiters = self.waiters, {}
        for waiter, _ in waiters.values():
            _answer(waiter, exc)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.conn.fail_pending()
        if self.transport is not None:
            self.transport.close()


def _answer(waiter: Waiter, answer: Response | PeerError) -> None:
    if isinstance(waiter, asyncio.Future):
        if waiter.done():
            return  # its caller gave up (cancelled)
        if isinstance(answer, Response):
            waiter.set_result(answer)
        else:
            waiter.set_exception(answer)
        return
    try:
        waiter(answer)
    except Exception:  # a bug there must not break the connection's other requests
        log.exception("a request's answer callback failed")


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
        self._unsent = 0  # calls waiting for the connection: send_now must not overtake them

    async def _connection(self, connect_timeout: float | None = None) -> _ClientProtocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            proto = self._proto
            if proto is not None and not proto.lost:
                return proto
            loop = asyncio.get_running_loop()
            conn = ClientConnection(self._secret, self._node)
            try:
                async with asyncio.timeout(connect_timeout or self.connect_timeout):
                    _, proto = await loop.create_connection(
                        lambda: _ClientProtocol(conn, self.request_timeout), self.host, self.port
                    )
                    await proto.ready
            except OSError as exc:
                raise PeerUnavailable(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
            except TimeoutError:
                raise PeerUnavailable(f"timed out connecting to {self.host}:{self.port}") from None
            self._proto = proto
            return proto

    async def call(
        self, build: Callable[[int], Request], connect_timeout: float | None = None
    ) -> Response:
        """Send `build(request_id)` and wait for its answer (`connect_timeout`: this call's,
        should it have to connect; PeerUnavailable after `request_timeout`: the
        connection's deadline timer)."""
        self._unsent += 1
        try:
            proto = await self._connection(connect_timeout)
            fut = proto.send(build(proto.conn.next_id()))
        finally:
            self._unsent -= 1
        try:
            return await fut
        except PeerUnavailable as exc:
            raise PeerUnavailable(f"{self.host}:{self.port}: {exc}") from None

    def send_now(self, build: Callable[[int], Request]) -> asyncio.Future[Response] | None:
        """Like `call`, without a coroutine: the answer's future, if a connection is up now
        (else None: use `call`). The hot path's forwards (no Task per request)."""
        proto = self._proto
        if proto is None or proto.lost or self._unsent:
            return None  # connecting, or calls still waiting to send: stay behind them
        return proto.send(build(proto.conn.next_id()))

    def send_now_to(self, build: Callable[[int], Request], on_answer: OnAnswer) -> bool:
        """`send_now` with its answer handed to `on_answer` from the receive callback (no
        future): True if sent, False if no connection is up now (use `call`)."""
        proto = self._proto
        if proto is None or proto.lost or self._unsent:
            return False
        proto.send_to(build(proto.conn.next_id()), on_answer)
        return True

    async def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()

    def abort(self) -> None:
        """Drop the connection at once, unsent bytes too: requests in flight fail now."""
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.abort()

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
