"""The asyncio side of the iSCSI target: sockets in, `TargetConnection` events out.

Thin on purpose (STYLE.md, "Sans-IO"): `IscsiConnectionProtocol.data_received` feeds the
`PduReader`, hands each PDU to the sans-IO `TargetConnection`, runs the SCSI commands it
emits as tasks, and writes the encoded PDUs with `transport.writelines` (data segments are
passed through as memoryviews, never copied here). `IscsiServer` owns the listening sockets,
the session registry (reinstatement, resets across sessions) and the host interface.

The host (chunk server, standalone target, tests) supplies a `TargetHost`: who may log in to
what, CHAP secrets, the SendTargets answer, and the `ScsiTarget` behind each target name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from lunastor.chunk.access.completion import Completion
from lunastor.chunk.stepped import Stepped
from lunastor.common.catch_up import caught_up, login_again
from lunastor.iscsi import pdu as p
from lunastor.iscsi.buffers import unexported
from lunastor.iscsi.connection import (
    CloseConnection,
    ExecuteCommand,
    SessionReinstated,
    SessionStarted,
    TargetConnection,
    TaskManagement,
)
from lunastor.iscsi.login_replay import LoginReplay
from lunastor.iscsi.resume import Resumed
from lunastor.iscsi.scsi.sense import LU_NOT_SUPPORTED, build_sense
from lunastor.iscsi.scsi.target import ScsiTarget
from lunastor.iscsi.scsi.types import (
    Nexus,
    ScsiCommand,
    ScsiResult,
    Status,
    TmfFunction,
    TmfResponse,
)
from lunastor.iscsi.session import Portal, Session, SessionRegistry, SessionType

log = logging.getLogger(__name__)

# Per session, never per command: the command path stays free of metric locks.
LOGINS = Counter("lunastor_iscsi_logins_total", "iSCSI sessions opened, by session type", ["type"])
SESSIONS = Gauge("lunastor_iscsi_sessions", "iSCSI sessions open now, by session type", ["type"])

# fixed-format sense: HARDWARE ERROR, INTERNAL TARGET FAILURE (an unexpected exception)
LOGOUT_SETTLE_TIMEOUT = 30.0  # seconds a logout waits for the reservation store, at most
_INTERNAL_TARGET_FAILURE = bytes([0x70, 0, 0x04, 0, 0, 0, 0, 10] + [0] * 4 + [0x44, 0, 0, 0, 0, 0])
_LU_NOT_SUPPORTED = build_sense(LU_NOT_SUPPORTED)


class TargetHost(Portal, Protocol):
    """The host interface: the login/discovery policy plus the SCSI target per name."""

    def scsi_target(self, name: str) -> ScsiTarget | None: ...


class NexusObserver(Protocol):
    """Told of every normal session's I_T nexus as it starts (the chunk server stores a new
    nexus epoch); the callable it returns is called once when that session ends."""

    def nexus_started(self, nexus: Nexus) -> Callable[[], None]: ...


@dataclass(slots=True)
class ServerConfig:
    listen: Sequence[tuple[str, int]]
    queue_depth: int = 128
    relative_port: int = 1
    tpgt: int = 1
    max_recv_data_segment_length: int = 262144  # what we accept per PDU after login
    ping_interval: float = 10.0  # NOP-In after this much silence
    ping_timeout: float = 20.0  # close if the ping is not answered
    max_write_length: int = 32 << 20
    write_budget: int = 64 << 20  # write buffers solicited by R2T per connection


class IscsiServer:
    def __init__(
        self,
        host: TargetHost,
        config: ServerConfig,
        observer: NexusObserver | None = None,
        catch_up: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`catch_up`: for a host that follows a source (etcd) some time behind, waits until
        the host serves all that the source holds now. A login refused as "not found" or
        "not authorised", and a command to a LUN the session does not see, are then decided
        again once (the volume and its export may have been committed just before, and
        announced to the initiator, while the host had not seen them yet)."""
        self.host = host
        self.config = config
        self.observer = observer
        self.catch_up = catch_up
        self._ended: dict[Session, Callable[[], None]] = {}
        self.registry = SessionRegistry()
        self.connections: set[IscsiConnectionProtocol] = set()
        self._by_session: dict[Session, IscsiConnectionProtocol] = {}
        self._servers: list[asyncio.Server] = []
        self._adopting: set[asyncio.Task[Any]] = set()
        self.trace = log.isEnabledFor(logging.DEBUG)  # log every PDU

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for host, port in self.config.listen:
                server = await loop.create_server(
                    lambda: IscsiConnectionProtocol(self), host, port, reuse_address=True
                )
                self._servers.append(server)
        except BaseException:
            await self.close()
            raise

    def adopt(self, sock: socket.socket) -> None:
        """Serve a connection accepted elsewhere (a chunk server's workers hand connections
        over, lunastor/chunk/workers.py)."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(
            loop.connect_accepted_socket(lambda: IscsiConnectionProtocol(self), sock)
        )
        self._adopting.add(task)
        task.add_done_callback(self._adopted)

    def _adopted(self, task: asyncio.Task[Any]) -> None:
        self._adopting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("an adopted connection failed: %s", task.exception())

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) pairs (useful with port 0)."""
        out = []
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                out.append((str(name[0]), int(name[1])))
        return out

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for proto in list(self.connections):
            proto.abort("server shutting down")
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def session_started(self, proto: IscsiConnectionProtocol, session: Session) -> None:
        self._by_session[session] = proto
        if self.observer is not None and session.session_type is SessionType.NORMAL:
            self._ended[session] = self.observer.nexus_started(session.nexus)
        kind = session.session_type.name.lower()
        LOGINS.labels(kind).inc()
        SESSIONS.labels(kind).inc()

    def session_ended(self, proto: IscsiConnectionProtocol, session: Session) -> None:
        if self._by_session.get(session) is proto:
            del self._by_session[session]
            ended = self._ended.pop(session, None)
            if ended is not None:
                ended()
            SESSIONS.labels(session.session_type.name.lower()).dec()

    def connection_of(self, session: Session) -> IscsiConnectionProtocol | None:
        return self._by_session.get(session)

    def peers(self, target: str, exclude: IscsiConnectionProtocol) -> list[IscsiConnectionProtocol]:
        """The connections of the other normal sessions on `target`."""
        return [
            c
            for s in self.registry.for_target(target)
            if (c := self._by_session.get(s)) is not None and c is not exclude
        ]

    def request_logout(self, target: str | None = None, within: int = 10) -> None:
        """Ask the initiators of `target` (None: all) to log out, e.g. before draining."""
        for proto in list(self.connections):
            session = proto.session
            if session is not None and target in (None, session.target_name):
                proto.conn.request_logout(within)
                proto._flush()

    def abort_nexus_tasks(self, nexus: Nexus, lun: int) -> None:
        """For the SCSI layer (PREEMPT AND ABORT): abort `nexus`'s tasks on `lun`."""
        session = self.registry.find(nexus.initiator_name, nexus.isid, nexus.target_name)
        proto = self._by_session.get(session) if session is not None else None
        if proto is not None:
            proto.cancel(proto.conn.abort_tasks(lun))


RECEIVE_BUFFER = 1 << 20  # bytes the socket is read into at once (BufferedProtocol)
_RECEIVE_ROOM = 64 << 10  # less room than this left: start over, or take a fresh buffer


class IscsiConnectionProtocol(asyncio.BufferedProtocol):
    """One TCP connection. Everything here runs on the event loop thread.

    The socket is read straight into a receive buffer of ours (`get_buffer` /
    `buffer_updated`); the connection frames PDUs from views of it without copying, so a
    PDU's data segment (immediate write data, a Data-Out) is a view of what the kernel wrote.
    The buffer is filled from its start again once the reader holds nothing and no view of
    it is alive (`buffers.unexported`); otherwise a fresh one is taken and the old one lives
    as long as views of it do.
    """

    def __init__(self, server: IscsiServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self._local_address = ""
        self.conn = self._new_connection()
        # until the first answer: a login refused on a view that may lag is run again
        self._replay: LoginReplay | None = None if server.catch_up is None else LoginReplay()
        self._relogin: asyncio.Task[None] | None = None
        self._caught_up_luns: set[int] = set()  # LUNs not found once, looked up again since
        self.transport: asyncio.Transport | None = None
        self.target: ScsiTarget | None = None
        self.session: Session | None = None
        self._running: dict[int, asyncio.Task[None] | _Driven] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._nexus_lost_done = False
        self._flush_soon = False
        self._rbuf = bytearray(RECEIVE_BUFFER)
        self._rpos = 0
        self._rview: memoryview | None = None

    def _new_connection(self) -> TargetConnection:
        cfg = self.server.config
        conn = TargetConnection(
            self.server.host,
            self.server.registry,
            queue_depth=cfg.queue_depth,
            relative_port=cfg.relative_port,
            tpgt=cfg.tpgt,
            target_mrdsl=cfg.max_recv_data_segment_length,
            max_write_length=cfg.max_write_length,
            write_budget=cfg.write_budget,
            ping_interval=cfg.ping_interval,
            ping_timeout=cfg.ping_timeout,
            now=self.loop.time(),
        )
        conn.local_address = self._local_address
        if self.server.trace:
            conn.on_pdu = _trace_in
        return conn

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local = transport.get_extra_info("sockname")
        if local:
            host = str(local[0])
            self._local_address = f"[{host}]:{local[1]}" if ":" in host else f"{host}:{local[1]}"
            self.conn.local_address = self._local_address
        self.server.connections.add(self)
        self._timer = self.loop.call_later(1.0, self._tick)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._rview is not None:
            # the loop let go of the view it read into (uvloop holds it through
            # buffer_updated, so it is released here, not there)
            with contextlib.suppress(BufferError):
                self._rview.release()
            self._rview = None
        buf, pos = self._rbuf, self._rpos
        if len(buf) - pos < _RECEIVE_ROOM:
            if self.conn.reader.buffered or not unexported(buf):
                buf = self._rbuf = bytearray(RECEIVE_BUFFER)
            pos = self._rpos = 0
        view = self._rview = memoryview(buf)[pos:]
        return view

    def buffer_updated(self, nbytes: int) -> None:
        pos = self._rpos
        self._rpos = pos + nbytes
        with memoryview(self._rbuf) as whole:
            received = whole[pos : pos + nbytes]
        self.data_received(received)

    def data_received(self, data: bytes | memoryview) -> None:
        conn = self.conn
        conn.last_rx = self.loop.time()
        if self._replay is not None:
            self._replay.received(data)
        conn.receive_data(data, copy=not isinstance(data, memoryview))
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        self.cancel(self.conn.connection_lost())
        self.server.connections.discard(self)
        if self.session is not None:
            self.server.session_ended(self, self.session)
            self._nexus_lost()

    def pause_writing(self) -> None:
        # the initiator reads slower than we answer: stop taking new commands
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self._closing:
            self.transport.resume_reading()

    # --- plumbing -------------------------------------------------------------------------

    def _flush(self) -> None:
        conn = self.conn
        events = conn.events()
        close: CloseConnection | None = None
        for ev in events:
            if isinstance(ev, ExecuteCommand):
                self._start(ev)
            elif isinstance(ev, TaskManagement):
                self.loop.create_task(self._task_management(ev))
            elif isinstance(ev, SessionStarted):
                self._session_started(ev.session)
            elif isinstance(ev, SessionReinstated):
                old = self.server.connection_of(ev.old)
                if old is not None:
                    old._nexus_lost()
                    old.abort("session reinstated")
            elif isinstance(ev, CloseConnection):
                close = ev
        transport = self.transport
        if transport is None or self._closing:
            return
        if self.server.trace:
            for pdu in conn.queued():
                log.debug("-> %r %r", pdu, bytes(getattr(pdu, "data", b""))[:512])
                # (the fast path is off while tracing: every answer is a PDU object)
        if self._replay is not None and close is not None:
            sent = self._replay.refused(conn)
            if sent is not None:
                assert self.server.catch_up is not None
                self._replay = None
                self._relogin = login_again(
                    transport, self.server.catch_up, lambda: self._closing, self._login_again, sent
                )
                return
        bufs = conn.data_to_send()
        if self._replay is not None and bufs:
            self._replay = None  # answered: nothing to run again from here on
        if close is not None and close.reason == "logout" and self.target is not None:
            # The session's SPC-2 reservation ends with it, through the reservation store:
            # answer the logout only once every access point applied that, since another
            # initiator's RESERVE may follow at once on another chunk server.
            self._closing = True
            self._nexus_lost()
            self.loop.create_task(self._answer_logout(self.target, bufs))
            return
        if bufs:
            transport.writelines(bufs)
        if close is not None:
            log.info("closing iSCSI connection: %s", close.reason)
            self._closing = True
            transport.close()

    def _login_again(self, sent: bytes) -> None:
        """The first answer refused the login as "not found" or "not authorised" (held, not
        sent): the host caught up, run the login again on a fresh `TargetConnection`
        (`LoginReplay`)."""
        self.conn = self._new_connection()
        self.data_received(sent)

    async def _answer_logout(self, target: ScsiTarget, bufs: Sequence[Any]) -> None:
        try:
            async with asyncio.timeout(LOGOUT_SETTLE_TIMEOUT):
                await target.settle()
        except Exception:  # answer anyway: the initiator is leaving
            log.warning("logout: the reservation store did not settle in time")
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if bufs:
                transport.writelines(bufs)
            log.info("closing iSCSI connection: logout")
            transport.close()

    def _session_started(self, session: Session) -> None:
        self.session = session
        if session.session_type is SessionType.NORMAL:
            self.target = self.server.host.scsi_target(session.target_name)
            if self.target is None:
                self.abort("target vanished during login")
                return
            self.conn.fast_lanes = self.target.fast_lane
        self.server.session_started(self, session)

    def _start(self, ev: ExecuteCommand) -> None:
        """Run the command's first step right here: a block device that answers without
        waiting (a local file read, memory) completes without an asyncio task or an extra
        loop iteration (Python 3.12's eager tasks, by hand for 3.11)."""
        target = self.target
        assert target is not None
        _Driven(self, ev.itt, ev.command, target.execute(ev.command)).step()

    def _failed(self, cmd: _Driven, exc: BaseException, cancelled: bool) -> None:
        if isinstance(exc, asyncio.CancelledError):
            if self._running.get(cmd.itt) is cmd:
                del self._running[cmd.itt]
            if cancelled:
                return  # aborted by task management or connection loss: no answer
            # not ours: the coroutine cancelled itself; still an answer
        self._done(cmd, self._internal_failure(cmd.command))

    def _done(self, cmd: _Driven, result: ScsiResult) -> None:
        if self._running.get(cmd.itt) is cmd:
            del self._running[cmd.itt]
        if (
            result.status is Status.CHECK_CONDITION
            and result.sense == _LU_NOT_SUPPORTED
            and self._lun_again(cmd)
        ):
            return
        self.conn.command_done(cmd.itt, result)
        if cmd.waiting is not None:
            self._flush_later()  # resumed from a callback: not inside _flush
        # (a command done in its first step is answered by the _flush that started it)

    def _lun_again(self, cmd: _Driven) -> bool:
        """A command found no LUN (it ran nothing): once per LUN and connection, run it again
        after the host caught up with its source (an export committed just before)."""
        lun = cmd.command.lun
        target = self.target
        if self.server.catch_up is None or target is None or lun in self._caught_up_luns:
            return False
        self._caught_up_luns.add(lun)
        _Driven(self, cmd.itt, cmd.command, self._caught_up(target, cmd.command)).step()
        return True

    async def _caught_up(self, target: ScsiTarget, cmd: ScsiCommand) -> ScsiResult:
        assert self.server.catch_up is not None
        await caught_up(self.server.catch_up, f"LUN {cmd.lun} not found")
        return await target.execute(cmd)

    @staticmethod
    def _internal_failure(cmd: ScsiCommand) -> ScsiResult:
        # a bug in the SCSI layer must not kill the connection
        log.exception("SCSI command failed unexpectedly (CDB %s)", cmd.cdb[:16].hex())
        return ScsiResult(Status.CHECK_CONDITION, sense=_INTERNAL_TARGET_FAILURE)

    async def _resume(
        self,
        itt: int,
        cmd: ScsiCommand,
        coro: Coroutine[Any, Any, ScsiResult],
        waiting: Any,
    ) -> None:
        """Drive a command coroutine that had to wait: this task takes over the future it
        yielded, as if it had run the coroutine from the start (`Resumed`)."""
        try:
            result: ScsiResult = await Resumed(coro, waiting)
        except asyncio.CancelledError:
            raise  # aborted by task management or connection loss
        except Exception:
            result = self._internal_failure(cmd)
        finally:
            self._running.pop(itt, None)
        self.conn.command_done(itt, result)
        self._flush_later()

    def _flush_later(self) -> None:
        if not self._flush_soon:
            # completions that finish in the same loop iteration share one writelines()
            self._flush_soon = True
            self.loop.call_soon(self._deferred_flush)

    def _deferred_flush(self) -> None:
        self._flush_soon = False
        self._flush()

    def cancel(self, itts: list[int]) -> list[asyncio.Task[None]]:
        """Abort the commands `itts`; returns the tasks still ending (to be awaited). A
        command resumed by callback is ended here and now, as a Task's cancellation would
        end it: its future is cancelled and CancelledError thrown in where it waits."""
        tasks = []
        for itt in itts:
            running = self._running.pop(itt, None)
            if isinstance(running, _Driven):
                running.cancel()
                later = self._running.pop(itt, None)  # its clean-up waits: in a Task now
                if isinstance(later, asyncio.Task):
                    tasks.append(later)  # (already cancelled: CancelledError is in it)
            elif running is not None:
                running.cancel()
                tasks.append(running)
        return tasks

    async def _task_management(self, ev: TaskManagement) -> None:
        waits = self.cancel(ev.abort)
        peers: list[IscsiConnectionProtocol] = []
        if ev.others:
            lun = None if ev.function in _TARGET_RESETS else ev.lun
            peers = self.server.peers(ev.nexus.target_name, self)
            for peer in peers:
                waits += peer.cancel(peer.conn.abort_tasks(lun))
        if waits:
            await asyncio.gather(*waits, return_exceptions=True)
        response = ev.response
        if response is None:
            target = self.target
            if target is None:
                response = TmfResponse.REJECTED
            else:
                try:
                    response = target.task_management(ev.nexus, ev.function, ev.lun)
                    # a reset reaches the other access points through the reservation store:
                    # answer only once they all applied it
                    await target.settle()
                except Exception:
                    log.exception("task management %s failed", ev.function.name)
                    response = TmfResponse.REJECTED
        self.conn.tmf_done(ev.itt, response)
        self._flush()
        if ev.function is TmfFunction.TARGET_COLD_RESET and response is TmfResponse.COMPLETE:
            for peer in peers:
                peer.abort("target cold reset")

    def _tick(self) -> None:
        if self._closing:
            return
        self.conn.tick(self.loop.time())
        self._flush()
        self._timer = self.loop.call_later(1.0, self._tick)

    def _nexus_lost(self) -> None:
        """Tell the SCSI layer, once, that this session's I_T nexus is gone."""
        if self._nexus_lost_done or self.session is None or self.target is None:
            return
        self._nexus_lost_done = True
        try:
            self.target.nexus_lost(self.session.nexus)
        except Exception:
            log.exception("nexus_lost failed")

    def abort(self, reason: str) -> None:
        """Drop the connection now (no goodbye): reinstatement, shutdown, cold reset."""
        if self.transport is not None and not self.transport.is_closing():
            log.info("aborting iSCSI connection: %s", reason)
            self.transport.abort()
        self._closing = True


class _Driven(Stepped[ScsiResult]):
    """A command coroutine driven without a Task (`IscsiConnectionProtocol._start`). One that
    waits on a `Completion` (a replicated write awaiting its secondaries) is resumed from
    that future's done callback: no Task per command. Anything else it waits on gets a Task
    from here on (`_resume`), where asyncio.timeout and the like work."""

    __slots__ = ("command", "itt", "proto")

    def __init__(
        self,
        proto: IscsiConnectionProtocol,
        itt: int,
        command: ScsiCommand,
        coro: Coroutine[Any, Any, ScsiResult],
    ) -> None:
        super().__init__(coro)
        self.proto = proto
        self.itt = itt
        self.command = command

    def yielded(self, waiting: Any) -> None:
        proto = self.proto
        if type(waiting) is Completion and not waiting.done():
            self.wait_on(waiting)
            proto._running[self.itt] = self
            return
        self.waiting = None
        proto._running[self.itt] = proto.loop.create_task(
            proto._resume(self.itt, self.command, self.coro, waiting)
        )

    def finished(self, result: ScsiResult) -> None:
        self.proto._done(self, result)

    def failed(self, exc: BaseException, cancelled: bool) -> None:
        self.proto._failed(self, exc, cancelled)


_TARGET_RESETS = (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET)


def _trace_in(pdu: p.Pdu) -> None:
    log.debug("<- %r %r", pdu, bytes(getattr(pdu, "data", b""))[:512])
