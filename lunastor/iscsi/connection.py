"""The target side of one iSCSI connection, sans-IO (RFC 7143; ERL 0, MaxConnections=1).

Feed decoded PDUs with `receive_pdu` (or a decoding error with `receive_error`), collect
what to do with `events()` and what to send with `pdus_to_send()` / `data_to_send()`, and
report back with `command_done` / `tmf_done`. No asyncio, no sockets: the chunk server's
`iscsi_server` and the unit tests drive it the same way.

Phases: LOGIN (driven by `login.LoginNegotiator`) -> FULL_FEATURE -> CLOSED. In full
feature phase the connection keeps, per task (keyed by ITT), where its write data stands
(immediate, unsolicited, R2T sequences) and whether its CmdSN has been delivered; a
command is handed to the host (`ExecuteCommand`) once it is delivered in CmdSN order and
all its data has arrived. See docs/iscsi-session.md.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from lunastor.iscsi import pdu as p
from lunastor.iscsi.errors import (
    DataDigestError,
    LoginStatus,
    RejectReason,
    RemoteProtocolError,
)
from lunastor.iscsi.login import LoginNegotiator, LoginReply, LoginStep
from lunastor.iscsi.params import ConnectionParams, SessionParams, TargetSettings
from lunastor.iscsi.scsi.types import (
    Nexus,
    ScsiCommand,
    ScsiResult,
    Status,
    TaskAttribute,
    TmfFunction,
    TmfResponse,
)
from lunastor.iscsi.session import (
    Portal,
    PortalLoginPolicy,
    Session,
    SessionRegistry,
    SessionType,
    sn_add,
    sn_le,
    sn_lt,
)
from lunastor.iscsi.text import encode_text, parse_text

RESERVED = p.RESERVED_TAG
Buffer = bytes | bytearray | memoryview


# --- events for the host ----------------------------------------------------------------------


@dataclass(slots=True)
class ExecuteCommand:
    """Run `command` on the SCSI target, then call `command_done(itt, result)`."""

    itt: int
    command: ScsiCommand


@dataclass(slots=True)
class TaskManagement:
    """Cancel the executions of `abort` (ITTs of this connection) and wait for them; for
    `others` (LU/target resets, CLEAR TASK SET), abort the matching tasks of the other sessions
    of the target (`TargetConnection.abort_tasks`); then, unless `response` is already set,
    call the SCSI layer's `task_management(nexus, function, lun)`; finally `tmf_done(itt, r)`.
    """

    itt: int
    nexus: Nexus
    function: TmfFunction
    lun: int
    abort: list[int]
    others: bool
    response: TmfResponse | None = None  # decided here (e.g. ABORT TASK): skip the SCSI layer


@dataclass(slots=True)
class SessionStarted:
    """Login completed: a normal or discovery session is in full feature phase."""

    session: Session


@dataclass(slots=True)
class SessionReinstated:
    """A new login replaced `old` (same initiator, ISID and target): close its connection."""

    old: Session


@dataclass(slots=True)
class CloseConnection:
    """Send what is queued, then close the socket. `reason` is for the log."""

    reason: str


Event = ExecuteCommand | TaskManagement | SessionStarted | SessionReinstated | CloseConnection


class Phase(Enum):
    LOGIN = "login"
    FULL_FEATURE = "full feature"
    LOGGED_OUT = "logged out"  # Logout Response queued; nothing more is accepted
    CLOSED = "closed"


class TaskState(Enum):
    RECEIVING = "receiving"  # data-out outstanding
    READY = "ready"  # data complete, waiting for CmdSN delivery
    EXECUTING = "executing"  # handed to the host


@dataclass(slots=True, eq=False)
class _R2T:
    offset: int
    length: int
    received: int = 0
    next_data_sn: int = 0


@dataclass(slots=True, eq=False)
class Task:
    itt: int
    cmd_sn: int
    immediate: bool
    lun_field: int
    lun: int
    cdb: bytes
    attr: int
    edtl: int
    read: bool
    write: bool
    delivered: bool = False
    state: TaskState = TaskState.RECEIVING
    buffer: bytearray | None = None  # write data, EDTL bytes
    data_view: Buffer = b""  # the data handed to SCSI (buffer, or the immediate data itself)
    received: int = 0  # bytes of write data in place
    unsolicited_end: int = 0  # end offset of the unsolicited burst still expected
    unsolicited_data_sn: int = 0
    next_r2t_offset: int = 0
    r2t_sn: int = 0
    r2ts: dict[int, _R2T] = field(default_factory=dict)
    canned: ScsiResult | None = None  # answered without the SCSI layer


@dataclass(slots=True, eq=False)
class _Held:
    """A non-command, non-immediate PDU waiting for its CmdSN turn."""

    pdu: p.Pdu


_MAX_TEXT = 64 * 1024  # cap on a continued Text Request, against memory abuse
_TOMBSTONE = object()  # a CmdSN "considered received" by ABORT TASK (RFC 7143 11.5.1 b)

_TMF_NAMES = {f.value for f in TmfFunction}
# fixed-format sense: ILLEGAL REQUEST, INVALID FIELD IN CDB (SPC-4 4.5.3)
# ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR
_CRC_ERROR = bytes([0x70, 0, 0x0B, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x47, 0x05, 0, 0, 0, 0])
_DATA_PHASE_ERROR = bytes([0x70, 0, 0x0B, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x4B, 0, 0, 0, 0, 0])
_INVALID_FIELD_IN_CDB = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0])


class TargetConnection:
    """One connection of a target portal. Not thread-safe; one event loop drives it."""

    def __init__(
        self,
        portal: Portal,
        registry: SessionRegistry,
        *,
        queue_depth: int = 128,
        relative_port: int = 1,
        tpgt: int = 1,
        target_mrdsl: int = 262144,
        max_write_length: int = 32 << 20,
        write_budget: int = 64 << 20,
        ping_interval: float = 10.0,
        ping_timeout: float = 20.0,
        now: float = 0.0,
        settings: TargetSettings | None = None,
        random_bytes: Callable[[int], bytes] | None = None,
    ) -> None:
        self.portal = portal
        self.registry = registry
        self.queue_depth = queue_depth
        self.relative_port = relative_port
        self.tpgt = tpgt
        self.phase = Phase.LOGIN
        self.session: Session | None = None
        self.connection_params: ConnectionParams | None = None  # negotiated at login
        self.params: SessionParams  # set when login completes; only FFP handlers use it
        self.cid = 0
        self.stat_sn = 0
        self.header_digest = False
        self.data_digest = False
        self._digests_after_login: tuple[bool, bool] | None = None
        self.max_xmit = 8192  # the initiator's MaxRecvDataSegmentLength
        self.tasks: dict[int, Task] = {}
        self._held: dict[int, object] = {}  # CmdSN -> Task | _Held | _TOMBSTONE
        self._ttt_next = 1
        self._ttt_owner: dict[int, Task] = {}
        self._out: list[p.Pdu] = []
        self._events: list[Event] = []
        self.target_mrdsl = target_mrdsl  # ours: what we accept in one data segment
        self.max_write_length = max_write_length
        self.write_budget = write_budget  # bytes of write buffers R2Ts may have outstanding
        self._write_buffered = 0
        self._r2t_queue: deque[Task] = deque()
        self.local_address = ""  # "host:port" of our side, for SendTargets
        self.last_rx = now
        self.settings = settings or TargetSettings(
            max_recv_data_segment_length=target_mrdsl, target_portal_group_tag=tpgt
        )
        self._login = LoginNegotiator(
            PortalLoginPolicy(portal, registry), self.settings, random_bytes=random_bytes
        )
        self._text_pending: tuple[int, bytes] | None = None  # (ITT, rest of a long answer)
        self._text_ttt = 0
        self._text_in: tuple[int, int, bytes] | None = None  # (ITT, TTT, request so far)
        self._tmf_pending: dict[int, TaskManagement] = {}
        self._tmf_immediate: dict[int, bool] = {}
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._ping_sent: float | None = None
        self._ping_ttt = 0

    # --- output ---------------------------------------------------------------------------

    def events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def pdus_to_send(self) -> list[p.Pdu]:
        out, self._out = self._out, []
        self._switch_digests()
        return out

    def data_to_send(self) -> list[Buffer]:
        """Encoded buffers of every queued PDU, for `transport.writelines`."""
        bufs: list[Buffer] = []
        hd, dd = self.header_digest, self.data_digest
        for pdu in self._out:
            bufs += p.encode_pdu(pdu, hd, dd)
        self._out = []
        self._switch_digests()
        return bufs

    def _switch_digests(self) -> None:
        if self._digests_after_login is not None:
            self.header_digest, self.data_digest = self._digests_after_login
            self._digests_after_login = None

    def _send(self, pdu: p.Pdu) -> None:
        self._out.append(pdu)

    def _status_sn(self) -> int:
        sn = self.stat_sn
        self.stat_sn = sn_add(sn, 1)
        return sn

    @property
    def exp_cmd_sn(self) -> int:
        return self.session.exp_cmd_sn if self.session else 0

    @property
    def max_cmd_sn(self) -> int:
        return self.session.max_cmd_sn if self.session else 0

    # --- input ----------------------------------------------------------------------------

    def receive_pdu(self, pdu: p.Pdu) -> None:
        if self.phase is Phase.FULL_FEATURE:
            handler = self._FFP.get(type(pdu))
            if handler is None:  # Login Request after login, target opcodes (reader refuses)
                self._protocol_error(pdu, f"{type(pdu).__name__} in full feature phase")
                return
            handler(self, pdu)
        elif self.phase is Phase.LOGIN:
            self._on_login_pdu(pdu)
        # LOGGED_OUT / CLOSED: ignore everything

    def receive_error(self, exc: RemoteProtocolError) -> None:
        """A PDU could not be decoded. Framing errors close; others get a Reject."""
        if self.phase is not Phase.FULL_FEATURE:
            self._close(f"bad PDU during login: {exc}")
            return
        if isinstance(exc, p.FramingError):
            self._close(f"framing error: {exc}")
            return
        header = exc.header or b""
        self._reject(exc.reason, header)
        if isinstance(exc, DataDigestError) and len(header) >= 20 and header[0] & 0x3F == 0x05:
            # a Data-Out lost to a digest error: ERL 0 cannot ask for it again, so end the
            # task with PROTOCOL SERVICE CRC ERROR (RFC 7143 7.8) instead of leaving it hanging
            task = self.tasks.get(int.from_bytes(header[16:20], "big"))
            if task is not None and task.state is TaskState.RECEIVING:
                self._end_task(task, _CRC_ERROR)

    def connection_lost(self) -> list[int]:
        """The socket is gone: forget everything; return the ITTs the host must cancel."""
        running = [t.itt for t in self.tasks.values() if t.state is TaskState.EXECUTING]
        self.tasks.clear()
        self._held.clear()
        self._ttt_owner.clear()
        if self.session is not None:
            self.registry.remove(self.session)
        self.phase = Phase.CLOSED
        return running

    def tick(self, now: float) -> None:
        """Timer: ping an idle initiator with a NOP-In, close if it never answers."""
        if self.phase is not Phase.FULL_FEATURE:
            return
        if self._ping_sent is not None:
            if now - self._ping_sent > self.ping_timeout:
                self._close("initiator did not answer NOP-In ping")
            return
        if now - self.last_rx >= self.ping_interval:
            self._ping_ttt = self._new_ttt()
            self._ping_sent = now
            self._send(
                p.NopIn(
                    itt=RESERVED,
                    ttt=self._ping_ttt,
                    statsn=self.stat_sn,
                    expcmdsn=self.exp_cmd_sn,
                    maxcmdsn=self.max_cmd_sn,
                )
            )

    def request_logout(self, within: int = 10) -> None:
        """Ask the initiator to log out within `within` seconds (Async Message, event 1), e.g.
        before this access point drains; the initiator then logs in again elsewhere."""
        s = self.session
        if self.phase is not Phase.FULL_FEATURE or s is None:
            return
        self._send(
            p.AsyncMessage(
                lun=0,
                statsn=self._status_sn(),
                expcmdsn=s.exp_cmd_sn,
                maxcmdsn=s.max_cmd_sn,
                async_event=p.AsyncEvent.LOGOUT_REQUESTED,
                parameter3=within,
            )
        )

    # --- errors ---------------------------------------------------------------------------

    def _close(self, reason: str) -> None:
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CLOSED
            self._events.append(CloseConnection(reason))

    def _reject(self, reason: int, header: Buffer) -> None:
        self._send(
            p.Reject(
                reason=reason,
                statsn=self._status_sn(),
                expcmdsn=self.exp_cmd_sn,
                maxcmdsn=self.max_cmd_sn,
                header=bytes(header),
            )
        )

    def _protocol_error(
        self, pdu: p.Pdu, why: str, reason: int = RejectReason.PROTOCOL_ERROR
    ) -> None:
        """RFC 7143 7.? at ERL 0: reject the PDU, then end the connection (session recovery)."""
        self._reject(reason, _header_of(pdu))
        self._close(why)

    # --- login ----------------------------------------------------------------------------

    def _on_login_pdu(self, pdu: p.Pdu) -> None:
        if not isinstance(pdu, p.LoginRequest):
            self._close(f"{type(pdu).__name__} before login completed")
            return
        reply = self._login.step(LoginStep.from_pdu(pdu))
        status = reply.status
        why = reply.message
        if reply.done and status is LoginStatus.SUCCESS:
            failure = self._start_session(reply, pdu.cmdsn)
            if failure is not None:
                status, why = failure
        if status is not reply.status:  # the session could not start after all
            resp = p.LoginResponse(
                csg=reply.csg,
                isid=reply.isid,
                itt=reply.itt,
                status_class=status.status_class,
                status_detail=status.status_detail,
            )
        else:
            resp = reply.to_pdu(statsn=0, expcmdsn=0, maxcmdsn=0)
        resp.statsn = self._status_sn()
        resp.expcmdsn = pdu.cmdsn
        resp.maxcmdsn = sn_add(pdu.cmdsn, self.queue_depth - 1)
        self._send(resp)
        if reply.done and status is not LoginStatus.SUCCESS:
            self._close(f"login failed: {status.name} {why}")

    def _start_session(self, reply: LoginReply, cmd_sn: int) -> tuple[LoginStatus, str] | None:
        """Enter full feature phase; returns (login status, why) if the session cannot be."""
        params, conn_params = reply.session, reply.connection
        assert params is not None and conn_params is not None
        session = Session(
            initiator_name=params.initiator_name,
            isid=params.isid,
            target_name=params.target_name or "",
            session_type=SessionType.DISCOVERY if params.discovery else SessionType.NORMAL,
            tsih=params.tsih,
            params=params,
            queue_depth=self.queue_depth,
            relative_port=self.relative_port,
            tpgt=self.tpgt,
        )
        session.start_window(cmd_sn)
        old = self.registry.register(session)
        if session.tsih != params.tsih:
            self.registry.remove(session)
            return LoginStatus.OUT_OF_RESOURCES, "TSIH taken meanwhile"
        if old is not None:
            self._events.append(SessionReinstated(old))
        self.session = session
        self.params = params
        self.cid = conn_params.cid
        self.connection_params = conn_params
        self.max_xmit = conn_params.max_send_data_segment_length
        self.target_mrdsl = conn_params.max_recv_data_segment_length
        # digests start with the first PDU after the final Login Response (RFC 7143 13.1)
        self._digests_after_login = (conn_params.header_digest, conn_params.data_digest)
        self.phase = Phase.FULL_FEATURE
        self._events.append(SessionStarted(session))
        return None

    # --- CmdSN ordering -------------------------------------------------------------------

    def _accept_sn(self, cmd_sn: int, immediate: bool, item: object) -> bool | None:
        """Place a PDU in the CmdSN order.

        Returns True to process it now, False if it waits for a gap, None to drop it
        (outside the window, RFC 7143 4.2.2.1: silently ignored).
        """
        s = self.session
        assert s is not None
        if immediate:
            return True
        exp = s.exp_cmd_sn
        if cmd_sn == exp and exp != (s.max_cmd_sn + 1) & 0xFFFFFFFF:
            s.exp_cmd_sn = (exp + 1) & 0xFFFFFFFF  # the common case: next in order, room left
            return True
        if not sn_le(cmd_sn, s.max_cmd_sn):
            return None  # beyond the window (also when the window is full: exp = max + 1)
        if cmd_sn == s.exp_cmd_sn:
            s.exp_cmd_sn = sn_add(cmd_sn, 1)
            return True
        if sn_lt(s.exp_cmd_sn, cmd_sn):
            if cmd_sn in self._held:
                return None  # a duplicate of one already waiting
            self._held[cmd_sn] = item
            return False
        return None

    def _drain(self) -> None:
        """Deliver every held PDU whose turn has come."""
        s = self.session
        assert s is not None
        held = self._held
        while held and s.exp_cmd_sn in held:
            item = held.pop(s.exp_cmd_sn)
            s.exp_cmd_sn = sn_add(s.exp_cmd_sn, 1)
            if item is _TOMBSTONE:
                self._release_slot()
            elif isinstance(item, Task):
                item.delivered = True
                self._maybe_execute(item)
            elif isinstance(item, _Held):
                self._FFP_ORDERED[type(item.pdu)](self, item.pdu)

    def _release_slot(self) -> None:
        """A non-immediate PDU is answered: the window may slide (MaxCmdSN never decreases)."""
        s = self.session
        assert s is not None
        s.max_cmd_sn = sn_add(s.max_cmd_sn, 1)

    def _ordered(self, pdu: Any) -> bool:
        """For NOP-Out/Text/TMF/Logout: True to process now; else held or dropped."""
        ok = self._accept_sn(pdu.cmdsn, pdu.immediate, _Held(pdu))
        return bool(ok)

    def _done_ordered(self, pdu: Any) -> None:
        if not pdu.immediate:
            self._release_slot()

    # --- SCSI commands --------------------------------------------------------------------

    def _on_scsi_command(self, pdu: p.ScsiCommand) -> None:
        s = self.session
        assert s is not None
        if s.session_type is SessionType.DISCOVERY:
            self._protocol_error(pdu, "SCSI command in a discovery session")
            return
        if pdu.itt in self.tasks:
            # RFC 7143 11.17.1: a task tag already in use
            if self._consume_sn(pdu) is not None:
                self._reject(RejectReason.TASK_IN_PROGRESS, _header_of(pdu))
            return
        params = self.params
        edtl = pdu.expected_data_transfer_length
        imm = len(pdu.data)
        error = None
        if imm and not pdu.write:
            error = "data segment in a command without the W bit"
        elif imm and not params.immediate_data:
            error = "immediate data while ImmediateData=No"
        elif imm > edtl or imm > params.first_burst_length:
            error = "immediate data beyond EDTL or FirstBurstLength"
        elif not pdu.final and (params.initial_r2t or not pdu.write):
            error = "F bit clear without unsolicited data allowed"
        elif pdu.write and not pdu.final and imm >= min(edtl, params.first_burst_length):
            error = "F bit clear but the first burst is complete"
        if error is not None:
            self._consume_sn(pdu)
            self._protocol_error(pdu, error)
            return
        lun = p.lun_number(pdu.lun)
        task = Task(  # positional: this runs for every command
            pdu.itt,
            pdu.cmdsn,
            pdu.immediate,
            pdu.lun,
            0xFFFF if lun is None else lun,
            pdu.cdb,
            pdu.attr,
            edtl,
            pdu.read,
            pdu.write,
        )
        placed = self._accept_sn(pdu.cmdsn, pdu.immediate, task)
        if placed is None:
            return  # outside the window: silently dropped
        self.tasks[task.itt] = task
        task.delivered = placed
        if pdu.write and edtl > self.max_write_length:
            # refuse before buffering anything: ILLEGAL REQUEST, INVALID FIELD IN CDB
            task.state = TaskState.READY
            task.canned = ScsiResult(Status.CHECK_CONDITION, sense=_INVALID_FIELD_IN_CDB)
        elif pdu.write and edtl:
            if imm == edtl:
                task.data_view = pdu.data  # everything came with the command: no copy
            elif imm or not pdu.final:
                self._allocate(task)
                if imm:
                    task.buffer[:imm] = pdu.data  # type: ignore[index]
            task.received = imm
            if not pdu.final:
                task.unsolicited_end = min(edtl, params.first_burst_length)
            task.next_r2t_offset = imm if pdu.final else task.unsolicited_end
            if imm == edtl:
                task.state = TaskState.READY
            elif pdu.final:
                self._start_r2ts(task)
        else:
            task.state = TaskState.READY
        if placed:
            self._maybe_execute(task)
            if self._held:
                self._drain()

    def _allocate(self, task: Task) -> None:
        task.buffer = bytearray(task.edtl)
        task.data_view = task.buffer
        self._write_buffered += task.edtl

    def _free(self, task: Task) -> None:
        if task.buffer is not None:
            self._write_buffered -= len(task.buffer)
            task.buffer = None
            queue = self._r2t_queue
            while queue and self._write_buffered + queue[0].edtl <= self.write_budget:
                waiting = queue.popleft()
                if waiting.itt in self.tasks:
                    self._start_r2ts(waiting)

    def _start_r2ts(self, task: Task) -> None:
        """Solicit the rest of the data, once its buffer fits the write budget."""
        if task.buffer is None:
            if self._write_buffered and self._write_buffered + task.edtl > self.write_budget:
                self._r2t_queue.append(task)
                return
            self._allocate(task)
        self._send_r2ts(task)

    def _consume_sn(self, pdu: Any) -> bool | None:
        """A PDU we answer without processing still uses up its CmdSN (and releases it)."""
        placed = self._accept_sn(pdu.cmdsn, pdu.immediate, _TOMBSTONE)
        if placed and not pdu.immediate:
            self._release_slot()
            self._drain()
        return placed

    def _maybe_execute(self, task: Task) -> None:
        if task.state is not TaskState.READY or not task.delivered:
            return
        s = self.session
        assert s is not None
        task.state = TaskState.EXECUTING
        if task.canned is not None:
            self.command_done(task.itt, task.canned)
            return
        data: Buffer = b""
        if task.write:
            data = task.data_view
        self._events.append(
            ExecuteCommand(
                task.itt,
                ScsiCommand(  # positional, in field order: this runs for every command
                    s.nexus,
                    task.lun,
                    task.cdb,
                    task.itt,
                    _attribute(task.attr),
                    task.edtl,
                    data,
                ),
            )
        )

    def _new_ttt(self) -> int:
        ttt = self._ttt_next
        self._ttt_next = ttt + 1 if ttt < 0xFFFFFFFE else 1
        return ttt

    def _send_r2ts(self, task: Task) -> None:
        s = self.session
        assert s is not None
        params = self.params
        while task.next_r2t_offset < task.edtl and len(task.r2ts) < params.max_outstanding_r2t:
            offset = task.next_r2t_offset
            length = min(params.max_burst_length, task.edtl - offset)
            ttt = self._new_ttt()
            task.r2ts[ttt] = _R2T(offset, length)
            self._ttt_owner[ttt] = task
            task.next_r2t_offset = offset + length
            self._send(
                p.R2T(
                    lun=task.lun_field,
                    itt=task.itt,
                    ttt=ttt,
                    statsn=self.stat_sn,
                    expcmdsn=s.exp_cmd_sn,
                    maxcmdsn=s.max_cmd_sn,
                    r2t_sn=task.r2t_sn,
                    buffer_offset=offset,
                    desired_data_transfer_length=length,
                )
            )
            task.r2t_sn += 1

    def _on_data_out(self, pdu: p.DataOut) -> None:
        task = self.tasks.get(pdu.itt)
        if task is None or task.state is not TaskState.RECEIVING:
            # an aborted task or a command dropped outside the window: discard silently
            return
        n = len(pdu.data)
        off = pdu.buffer_offset
        if pdu.ttt == RESERVED:
            # unsolicited burst (InitialR2T=No): DataSN from 0, offsets continuing
            if (
                task.unsolicited_end == 0
                or pdu.data_sn != task.unsolicited_data_sn
                or off != task.received
                or off + n > task.unsolicited_end
                or (pdu.final != (off + n == task.unsolicited_end))
            ):
                self._data_error(task, pdu, "unsolicited Data-Out out of sequence")
                return
            task.unsolicited_data_sn += 1
            self._place(task, off, pdu.data)
            if pdu.final:
                task.unsolicited_end = 0
                if task.received < task.edtl:
                    self._start_r2ts(task)
        else:
            r2t = task.r2ts.get(pdu.ttt)
            if r2t is None:
                self._data_error(task, pdu, "Data-Out for an unknown Target Transfer Tag")
                return
            end = r2t.offset + r2t.length
            if (
                pdu.data_sn != r2t.next_data_sn
                or off != r2t.offset + r2t.received
                or off + n > end
                or (pdu.final != (off + n == end))
            ):
                self._data_error(task, pdu, "Data-Out out of sequence for its R2T")
                return
            r2t.next_data_sn += 1
            r2t.received += n
            self._place(task, off, pdu.data)
            if pdu.final:
                del task.r2ts[pdu.ttt]
                del self._ttt_owner[pdu.ttt]
                self._send_r2ts(task)
        if task.received >= task.edtl and not task.r2ts and task.unsolicited_end == 0:
            task.state = TaskState.READY
            self._maybe_execute(task)

    def _place(self, task: Task, offset: int, data: Buffer) -> None:
        n = len(data)
        if n:
            assert task.buffer is not None
            task.buffer[offset : offset + n] = data
        task.received += n

    def _data_error(self, task: Task, pdu: p.DataOut, why: str) -> None:
        """ERL 0 has no recovery R2T: end the task with CHECK CONDITION, ABORTED COMMAND /
        DATA PHASE ERROR, discard its further Data-Out, keep the connection (RFC 7143 7.3)."""
        self._end_task(task, _DATA_PHASE_ERROR)

    def _end_task(self, task: Task, sense: bytes) -> None:
        """Answer a task that is still receiving data with CHECK CONDITION and `sense`."""
        for ttt in task.r2ts:
            self._ttt_owner.pop(ttt, None)
        task.r2ts.clear()
        task.unsolicited_end = 0
        task.canned = ScsiResult(Status.CHECK_CONDITION, sense=sense)
        task.state = TaskState.READY
        self._maybe_execute(task)

    def command_done(self, itt: int, result: ScsiResult) -> None:
        """The SCSI layer finished `itt`: queue Data-In and/or the SCSI Response."""
        task = self.tasks.pop(itt, None)
        if task is None or self.phase is not Phase.FULL_FEATURE:
            return  # aborted meanwhile: no response (RFC 7143 4.2.3.3)
        s = self.session
        assert s is not None
        if not task.immediate:
            self._release_slot()
        edtl = task.edtl
        data = result.data_in
        tl = result.transfer_length
        if task.read:
            sent = min(len(data), edtl)
            wanted = sent if tl is None else tl
        else:
            sent = 0
            wanted = task.received if tl is None else tl
            if not task.write:
                wanted = 0 if tl is None else tl
        overflow = wanted > edtl
        residual = wanted - edtl if overflow else edtl - (sent if task.read else wanted)
        underflow = not overflow and residual > 0
        if not task.read and not task.write and tl is None:
            underflow, residual = (edtl > 0), edtl
        collapse = sent > 0 and not result.sense
        if sent:
            self._send_data_in(task, data, sent, result, collapse, overflow, underflow, residual)
        if not collapse:
            self._send(
                p.ScsiResponse(
                    overflow=overflow,
                    underflow=underflow,
                    status=result.status,
                    itt=itt,
                    statsn=self._status_sn(),
                    expcmdsn=s.exp_cmd_sn,
                    maxcmdsn=s.max_cmd_sn,
                    residual_count=residual if (overflow or underflow) else 0,
                    sense=result.sense,
                )
            )
        if task.buffer is not None:
            self._free(task)  # after the response: R2Ts of waiting writes follow it

    def _send_data_in(
        self,
        task: Task,
        data: Buffer,
        length: int,
        result: ScsiResult,
        collapse: bool,
        overflow: bool,
        underflow: bool,
        residual: int,
    ) -> None:
        s = self.session
        assert s is not None
        seg = self.max_xmit
        burst = self.params.max_burst_length
        if length <= seg and length <= burst and collapse:
            # the common small read: one Data-In carrying the status
            flagged = overflow or underflow
            self._out.append(
                p.DataIn(
                    final=True,
                    status_present=True,
                    status=result.status,
                    overflow=overflow,
                    underflow=underflow,
                    lun=task.lun_field,
                    itt=task.itt,
                    statsn=self._status_sn(),
                    expcmdsn=s.exp_cmd_sn,
                    maxcmdsn=s.max_cmd_sn,
                    residual_count=residual if flagged else 0,
                    data=data if len(data) == length else memoryview(data)[:length],
                )
            )
            return
        view = data if isinstance(data, memoryview) else memoryview(data)
        offset = 0
        data_sn = 0
        while offset < length:
            n = min(seg, length - offset, burst - offset % burst)
            end = offset + n
            last = end == length
            pdu = p.DataIn(
                final=last or end % burst == 0,
                lun=task.lun_field,
                itt=task.itt,
                data_sn=data_sn,
                buffer_offset=offset,
                data=view[offset:end],
                expcmdsn=s.exp_cmd_sn,
                maxcmdsn=s.max_cmd_sn,
            )
            if last and collapse:
                pdu.status_present = True
                pdu.status = result.status
                pdu.statsn = self._status_sn()
                pdu.overflow = overflow
                pdu.underflow = underflow
                pdu.residual_count = residual if (overflow or underflow) else 0
            self._send(pdu)
            offset = end
            data_sn += 1

    # --- NOP ------------------------------------------------------------------------------

    def _on_nop_out(self, pdu: p.NopOut) -> None:
        if pdu.itt == RESERVED:
            # the answer to our ping (or an initiator's unsolicited "ping", which needs no
            # answer); RFC 7143 11.18: must be immediate
            if pdu.ttt != RESERVED and pdu.ttt == self._ping_ttt:
                self._ping_sent = None
            if not pdu.immediate:
                self._protocol_error(pdu, "NOP-Out without ITT must be immediate")
            return
        if pdu.ttt != RESERVED:
            self._protocol_error(
                pdu, "NOP-Out with both ITT and TTT", RejectReason.INVALID_PDU_FIELD
            )
            return
        if self._ordered(pdu):
            self._answer_nop(pdu)
            self._drain()

    def _answer_nop(self, pdu: p.NopOut) -> None:
        self._done_ordered(pdu)
        s = self.session
        assert s is not None
        data = pdu.data[: self.max_xmit]
        self._send(
            p.NopIn(
                lun=pdu.lun,
                itt=pdu.itt,
                ttt=RESERVED,
                statsn=self._status_sn(),
                expcmdsn=s.exp_cmd_sn,
                maxcmdsn=s.max_cmd_sn,
                data=bytes(data),
            )
        )

    # --- Text (full feature phase) --------------------------------------------------------

    def _on_text(self, pdu: p.TextRequest) -> None:
        if self._ordered(pdu):
            self._answer_text(pdu)
            self._drain()

    def _answer_text(self, pdu: p.TextRequest) -> None:
        self._done_ordered(pdu)
        s = self.session
        assert s is not None
        incoming = self._text_in
        if pdu.ttt != RESERVED and incoming is not None and pdu.ttt == incoming[1]:
            text = incoming[2] + bytes(pdu.data)  # the next part of a continued request
        elif pdu.ttt != RESERVED:
            # the initiator asks for the next part of a long answer
            if self._text_pending is None or pdu.ttt != self._text_ttt:
                self._reject(RejectReason.INVALID_PDU_FIELD, _header_of(pdu))
                return
            rest = self._text_pending[1]
            text = None
        else:
            text = bytes(pdu.data)
        if text is not None:
            self._text_in = None
            if pdu.cont:
                # more of the request follows: acknowledge with an empty response carrying a
                # TTT the initiator sends the rest under (RFC 7143 11.10.2)
                if len(text) > _MAX_TEXT:
                    self._reject(RejectReason.LONG_OP_REJECT, _header_of(pdu))
                    return
                ttt = self._new_ttt()
                self._text_in = (pdu.itt, ttt, text)
                self._send(
                    p.TextResponse(
                        final=False,
                        lun=pdu.lun,
                        itt=pdu.itt,
                        ttt=ttt,
                        statsn=self._status_sn(),
                        expcmdsn=s.exp_cmd_sn,
                        maxcmdsn=s.max_cmd_sn,
                    )
                )
                return
            try:
                pairs = parse_text(text)
            except RemoteProtocolError as exc:
                self._reject(exc.reason, _header_of(pdu))
                return
            rest = encode_text(self._text_answer(pairs))
        chunk, rest = rest[: self.max_xmit], rest[self.max_xmit :]
        more = bool(rest)
        ttt = RESERVED
        if more:
            ttt = self._text_ttt = self._new_ttt()
            self._text_pending = (pdu.itt, rest)
        else:
            self._text_pending = None
        self._send(
            p.TextResponse(
                final=not more,
                cont=more,
                lun=pdu.lun,
                itt=pdu.itt,
                ttt=ttt,
                statsn=self._status_sn(),
                expcmdsn=s.exp_cmd_sn,
                maxcmdsn=s.max_cmd_sn,
                data=chunk,
            )
        )

    def _text_answer(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        s = self.session
        assert s is not None
        answer: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                answer += self._send_targets(value)
            else:
                answer.append((key, "NotUnderstood"))
        return answer

    def _send_targets(self, value: str) -> list[tuple[str, str]]:
        s = self.session
        assert s is not None
        out: list[tuple[str, str]] = []
        for info in self.portal.discoverable(s.initiator_name, self.local_address):
            if s.session_type is SessionType.DISCOVERY:
                if value != "All" and value != info.name:
                    continue
            elif info.name != s.target_name or value not in ("", info.name):
                continue
            out.append(("TargetName", info.name))
            out += [("TargetAddress", a) for a in info.addresses]
        return out

    # --- Logout ---------------------------------------------------------------------------

    def _on_logout(self, pdu: p.LogoutRequest) -> None:
        if self._ordered(pdu):
            self._answer_logout(pdu)

    def _answer_logout(self, pdu: p.LogoutRequest) -> None:
        self._done_ordered(pdu)
        s = self.session
        assert s is not None
        if pdu.reason == p.LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY:
            code = p.LogoutResponseCode.RECOVERY_NOT_SUPPORTED
        elif pdu.reason == p.LogoutReason.CLOSE_CONNECTION and pdu.cid != self.cid:
            code = p.LogoutResponseCode.CID_NOT_FOUND
        else:
            code = p.LogoutResponseCode.CLOSED_SUCCESSFULLY
        self._send(
            p.LogoutResponse(
                response=code,
                itt=pdu.itt,
                statsn=self._status_sn(),
                expcmdsn=s.exp_cmd_sn,
                maxcmdsn=s.max_cmd_sn,
            )
        )
        if code == p.LogoutResponseCode.CLOSED_SUCCESSFULLY:
            self.phase = Phase.LOGGED_OUT
            self._events.append(CloseConnection("logout"))
        else:
            self._drain()

    # --- Task management ------------------------------------------------------------------

    def _on_tmf(self, pdu: p.TaskManagementRequest) -> None:
        s = self.session
        assert s is not None
        if s.session_type is SessionType.DISCOVERY:
            self._protocol_error(pdu, "task management in a discovery session")
            return
        if self._ordered(pdu):
            self._answer_tmf(pdu)
            self._drain()

    def _answer_tmf(self, pdu: p.TaskManagementRequest) -> None:
        s = self.session
        assert s is not None
        fn = pdu.function
        lun = p.lun_number(pdu.lun)
        lun_n = 0xFFFF if lun is None else lun
        if fn not in _TMF_NAMES:
            self._tmf_answer(pdu, TmfResponse.REJECTED)
            return
        function = TmfFunction(fn)
        if function is TmfFunction.TASK_REASSIGN:
            self._tmf_answer(pdu, TmfResponse.REASSIGNMENT_NOT_SUPPORTED)
            return
        if function is TmfFunction.ABORT_TASK:
            task = self.tasks.get(pdu.referenced_task_tag)
            if task is not None and task.lun_field == pdu.lun:
                abort = self._drop_tasks([task])
                req = TaskManagement(
                    pdu.itt, s.nexus, function, lun_n, abort, False, TmfResponse.COMPLETE
                )
            else:
                ref = pdu.ref_cmdsn
                in_window = sn_le(s.exp_cmd_sn, ref) and sn_le(ref, s.max_cmd_sn)
                before_tmf = pdu.immediate or sn_lt(ref, pdu.cmdsn)
                if in_window and before_tmf and ref not in self._held:
                    # RFC 7143 11.5.1 b): the command has not arrived; consider its CmdSN
                    # received, so that it is never executed, and report it aborted
                    if ref == s.exp_cmd_sn:
                        s.exp_cmd_sn = sn_add(ref, 1)
                        self._release_slot()
                    else:
                        self._held[ref] = _TOMBSTONE
                    self._tmf_answer(pdu, TmfResponse.COMPLETE)
                    self._drain()
                else:
                    self._tmf_answer(pdu, TmfResponse.TASK_DOES_NOT_EXIST)
                return
        elif function in (
            TmfFunction.ABORT_TASK_SET,
            TmfFunction.CLEAR_TASK_SET,
            TmfFunction.LOGICAL_UNIT_RESET,
            TmfFunction.CLEAR_ACA,
        ):
            doomed = [] if function is TmfFunction.CLEAR_ACA else self._tasks_on(lun_n)
            req = TaskManagement(
                pdu.itt,
                s.nexus,
                function,
                lun_n,
                self._drop_tasks(doomed),
                # TST=001b: each nexus has its own task set, so only an LU reset reaches
                # the other sessions' tasks
                function is TmfFunction.LOGICAL_UNIT_RESET,
            )
        else:  # target warm / cold reset
            req = TaskManagement(
                pdu.itt,
                s.nexus,
                function,
                lun_n,
                self._drop_tasks(list(self.tasks.values())),
                True,
            )
        self._tmf_pending[pdu.itt] = req
        self._tmf_immediate[pdu.itt] = pdu.immediate
        self._events.append(req)

    def _tasks_on(self, lun: int) -> list[Task]:
        return [t for t in self.tasks.values() if t.lun == lun]

    def _drop_tasks(self, tasks: list[Task]) -> list[int]:
        """Forget `tasks` (no responses will be sent); return those the host must cancel."""
        running = []
        for task in tasks:
            self.tasks.pop(task.itt, None)
            self._free(task)
            for ttt in task.r2ts:
                self._ttt_owner.pop(ttt, None)
            task.r2ts.clear()
            if task.state is TaskState.EXECUTING:
                running.append(task.itt)
            if not task.delivered:
                # still waiting for its CmdSN: keep the slot, but as a tombstone
                self._held[task.cmd_sn] = _TOMBSTONE
            elif not task.immediate:
                self._release_slot()
        return running

    def abort_tasks(self, lun: int | None) -> list[int]:
        """For another session's LU/target reset: drop our tasks on `lun` (None: all)."""
        if self.phase is not Phase.FULL_FEATURE:
            return []
        tasks = list(self.tasks.values()) if lun is None else self._tasks_on(lun)
        return self._drop_tasks(tasks)

    def tmf_done(self, itt: int, response: TmfResponse) -> None:
        req = self._tmf_pending.pop(itt, None)
        immediate = self._tmf_immediate.pop(itt, True)
        if req is None or self.phase is not Phase.FULL_FEATURE:
            return
        if not immediate:
            self._release_slot()
        self._send_tmf_response(itt, response)
        if req.function is TmfFunction.TARGET_COLD_RESET and response is TmfResponse.COMPLETE:
            self._close("target cold reset")

    def _tmf_answer(self, pdu: p.TaskManagementRequest, response: TmfResponse) -> None:
        self._done_ordered(pdu)
        self._send_tmf_response(pdu.itt, response)

    def _send_tmf_response(self, itt: int, response: TmfResponse) -> None:
        s = self.session
        assert s is not None
        self._send(
            p.TaskManagementResponse(
                response=response,
                itt=itt,
                statsn=self._status_sn(),
                expcmdsn=s.exp_cmd_sn,
                maxcmdsn=s.max_cmd_sn,
            )
        )

    # --- SNACK ----------------------------------------------------------------------------

    def _on_snack(self, pdu: p.SnackRequest) -> None:
        # ErrorRecoveryLevel=0: SNACK is not supported (RFC 7143 11.16)
        self._reject(RejectReason.PROTOCOL_ERROR, _header_of(pdu))

    _FFP: dict[type, Callable[[TargetConnection, Any], None]] = {
        p.ScsiCommand: _on_scsi_command,
        p.DataOut: _on_data_out,
        p.NopOut: _on_nop_out,
        p.TextRequest: _on_text,
        p.LogoutRequest: _on_logout,
        p.TaskManagementRequest: _on_tmf,
        p.SnackRequest: _on_snack,
    }
    _FFP_ORDERED: dict[type, Callable[[TargetConnection, Any], None]] = {
        p.NopOut: _answer_nop,
        p.TextRequest: _answer_text,
        p.LogoutRequest: _answer_logout,
        p.TaskManagementRequest: _answer_tmf,
    }


_ATTRIBUTES = {a.value: a for a in TaskAttribute}


def _attribute(attr: int) -> TaskAttribute:
    """The task attribute (reserved values read as SIMPLE); a dict, not an Enum call, since
    every command goes through here."""
    return _ATTRIBUTES.get(attr, TaskAttribute.SIMPLE)


def _header_of(pdu: p.Pdu) -> bytes:
    """The 48-byte header of a received PDU, for the Reject data segment."""
    return bytes(p.encode_pdu(pdu)[0][: p.BHS_LENGTH])
