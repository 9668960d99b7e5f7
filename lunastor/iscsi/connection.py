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

The connection is the session layer's front: framing, login, CmdSN ordering, commands, NOP,
Text, Logout and the command fast path. Two parts read on their own, each holding its state
and calling back into the connection for the shared state (tasks, sequence numbers, output):
`transfer.DataTransfer` (write data in: immediate, unsolicited, R2T and Data-Out; read data
out: Data-In and the SCSI Response) and `tmf.TaskManagementFunctions` (task management).
The methods they call are grouped below under "for the connection's parts".
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from crc32c import crc32c

from lunastor.iscsi import pdu as p
from lunastor.iscsi.buffers import BufferPool
from lunastor.iscsi.errors import (
    DataDigestError,
    FramingError,
    LoginStatus,
    RejectReason,
    RemoteProtocolError,
)
from lunastor.iscsi.login import LoginNegotiator, LoginPolicy, LoginReply, LoginStep
from lunastor.iscsi.params import ConnectionParams, SessionParams, TargetSettings
from lunastor.iscsi.scsi.lane import FastLane
from lunastor.iscsi.scsi.types import Nexus, ScsiCommand, ScsiResult, TaskAttribute, TmfResponse
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
from lunastor.iscsi.tmf import TaskManagement, TaskManagementFunctions
from lunastor.iscsi.transfer import CRC_ERROR, DataTransfer, Task, TaskState

RESERVED = p.RESERVED_TAG
Buffer = bytes | bytearray | memoryview


# --- events for the host ----------------------------------------------------------------------


@dataclass(slots=True)
class ExecuteCommand:
    """Run `command` on the SCSI target, then call `command_done(itt, result)`."""

    itt: int
    command: ScsiCommand


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


@dataclass(slots=True, eq=False)
class _Held:
    """A non-command, non-immediate PDU waiting for its CmdSN turn."""

    pdu: p.Pdu


_MAX_TEXT = 64 * 1024  # cap on a continued Text Request, against memory abuse
_TOMBSTONE = object()  # a CmdSN "considered received" by ABORT TASK (RFC 7143 11.5.1 b)

# The fast path's precompiled structs: a SCSI Command BHS with its 10- or 16-byte READ/WRITE
# CDB in one unpack, and the two answers it sends (Data-In, SCSI Response) in one pack each.
_CMD10 = struct.Struct(">BBxxIQIIIIxBIBHB6x")  # ... cdb: flags, lba, group, blocks, control
_CMD16 = struct.Struct(">BBxxIQIIIIxBQIBB")  # ... cdb: flags, lba, blocks, group, control
_DATA_IN = struct.Struct(">BBxBIQIIIIIIII")  # 0x25, flags, status, len, lun, itt, ttt, sns...
_RESPONSE = struct.Struct(">BBBBIQIIIIIIII")  # 0x21, flags, response, status, lens, ...
_FAST_READ = {0x28: _CMD10, 0x88: _CMD16}
_FAST_WRITE = {0x2A: _CMD10, 0x8A: _CMD16}
_RAW = (bytes, bytearray, memoryview)  # already encoded, in `_out` beside PDU objects
LaneProvider = Callable[[Nexus, int], FastLane | None]


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
        login_policy: LoginPolicy | None = None,
    ) -> None:
        """`login_policy` replaces the default `PortalLoginPolicy(portal, registry)` for hosts
        whose login decisions a `Portal` cannot express (the redirector)."""
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
        self.held: dict[int, object] = {}  # CmdSN -> Task | _Held | _TOMBSTONE
        self._ttt_next = 1
        self._out: list[p.Pdu | Buffer] = []  # PDUs, and what the fast path encoded
        self._events: list[Event] = []
        self.target_mrdsl = target_mrdsl  # ours: what we accept in one data segment
        self.transfer = DataTransfer(
            self, max_write_length=max_write_length, write_budget=write_budget
        )
        self.tmf = TaskManagementFunctions(self)
        self.local_address = ""  # "host:port" of our side, for SendTargets
        self.last_rx = now
        self.settings = settings or TargetSettings(
            max_recv_data_segment_length=target_mrdsl, target_portal_group_tag=tpgt
        )
        self._login = LoginNegotiator(
            login_policy or PortalLoginPolicy(portal, registry),
            self.settings,
            random_bytes=random_bytes,
        )
        self._text_pending: tuple[int, bytes] | None = None  # (ITT, rest of a long answer)
        self._text_ttt = 0
        self._text_in: tuple[int, int, bytes] | None = None  # (ITT, TTT, request so far)
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._ping_sent: float | None = None
        self._ping_ttt = 0
        self.login_failure: LoginStatus | None = None  # the status a failed login ended with
        # the PDU reader (receive_data); its digests and limits follow the negotiation
        self.reader = p.PduReader(max_recv_data_segment_length=8192, sender="initiator")
        # the fast path (receive_data): set by the host once the session has a SCSI target
        self.fast_lanes: LaneProvider | None = None
        self._lanes: dict[int, FastLane | None] = {}  # by raw LUN field
        self.fast_commands = 0  # commands the fast path answered (tests, metrics)
        self.on_pdu: Callable[[p.Pdu], None] | None = None  # trace hook (disables fast path)

    # --- output ---------------------------------------------------------------------------

    def events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def pdus_to_send(self) -> list[p.Pdu]:
        """The queued PDUs as objects (tests; what the fast path queued encoded is decoded)."""
        out: list[p.Pdu] = []
        raw: list[bytes] = []
        for item in self._out:
            if isinstance(item, _RAW):
                raw.append(bytes(item))
                continue
            if raw:
                out += self._decode_raw(b"".join(raw))
                raw = []
            out.append(item)
        if raw:
            out += self._decode_raw(b"".join(raw))
        self._out = []
        self._switch_digests()
        return out

    def _decode_raw(self, wire: bytes) -> list[p.Pdu]:
        reader = p.PduReader(
            max_recv_data_segment_length=1 << 24,
            header_digest=self.header_digest,
            data_digest=self.data_digest,
            sender="target",
        )
        reader.feed(wire)
        return list(reader)

    def queued(self) -> tuple[p.Pdu | Buffer, ...]:
        """What is queued to send, left queued (tracing: PDU objects and encoded buffers)."""
        return tuple(self._out)

    def data_to_send(self) -> list[Buffer]:
        """Encoded buffers of every queued PDU, for `transport.writelines`."""
        bufs: list[Buffer] = []
        hd, dd = self.header_digest, self.data_digest
        for pdu in self._out:
            if isinstance(pdu, _RAW):
                bufs.append(pdu)
            else:
                bufs += p.encode_pdu(pdu, hd, dd)
        self._out = []
        self._switch_digests()
        return bufs

    def _switch_digests(self) -> None:
        if self._digests_after_login is not None:
            self.header_digest, self.data_digest = self._digests_after_login
            self._digests_after_login = None

    @property
    def pool(self) -> BufferPool:
        """The write buffers (`DataTransfer`)."""
        return self.transfer.pool

    # --- for the connection's parts (transfer.py, tmf.py) ---------------------------------

    def send(self, pdu: p.Pdu) -> None:
        self._out.append(pdu)

    def status_sn(self) -> int:
        """The StatSN of a status being sent (and the next one's)."""
        sn = self.stat_sn
        self.stat_sn = sn_add(sn, 1)
        return sn

    def new_ttt(self) -> int:
        ttt = self._ttt_next
        self._ttt_next = ttt + 1 if ttt < 0xFFFFFFFE else 1
        return ttt

    def add_event(self, event: Event) -> None:
        self._events.append(event)

    def tombstone(self, cmd_sn: int) -> None:
        """Consider `cmd_sn` received without running anything under it: its turn only
        releases its slot of the window (ABORT TASK, RFC 7143 11.5.1 b)."""
        self.held[cmd_sn] = _TOMBSTONE

    @property
    def in_full_feature_phase(self) -> bool:
        return self.phase is Phase.FULL_FEATURE

    @property
    def exp_cmd_sn(self) -> int:
        return self.session.exp_cmd_sn if self.session else 0

    @property
    def max_cmd_sn(self) -> int:
        return self.session.max_cmd_sn if self.session else 0

    # --- input ----------------------------------------------------------------------------

    def receive_data(self, data: Buffer, *, copy: bool = True) -> None:
        """Bytes from the socket: frame them into PDUs and process each (the fast path
        answers plain READ/WRITE commands straight from the frame, see `_fast_command`).
        `copy=False`: `data` is not overwritten while views of it live (`PduReader.feed`)."""
        reader = self.reader
        reader.feed(data, copy=copy)
        while self.phase is Phase.FULL_FEATURE or self.phase is Phase.LOGIN:
            try:
                frame = reader.next_frame()
                if frame is None:
                    return
                buf = frame[0]
                if (
                    (buf[0] == 0x01 or buf[0] == 0x41)
                    and not frame[1]
                    and self.fast_lanes is not None
                    and self._fast_command(buf, frame[2], frame[3])
                ):
                    continue
                pdu = reader.decode_frame(frame)
            except FramingError as exc:
                self.receive_error(exc)
                return
            except RemoteProtocolError as exc:
                self.receive_error(exc)
                continue
            if self.on_pdu is not None:
                self.on_pdu(pdu)
            self.receive_pdu(pdu)

    def receive_pdu(self, pdu: p.Pdu) -> None:
        if self.phase is Phase.FULL_FEATURE:
            handler = self._FFP.get(type(pdu))
            if handler is None:  # Login Request after login, target opcodes (reader refuses)
                self.protocol_error(pdu, f"{type(pdu).__name__} in full feature phase")
                return
            handler(self, pdu)
        elif self.phase is Phase.LOGIN:
            self._on_login_pdu(pdu)
        # LOGGED_OUT / CLOSED: ignore everything

    def receive_error(self, exc: RemoteProtocolError) -> None:
        """A PDU could not be decoded. Framing errors close; others get a Reject."""
        if self.phase is not Phase.FULL_FEATURE:
            self.close(f"bad PDU during login: {exc}")
            return
        if isinstance(exc, p.FramingError):
            self.close(f"framing error: {exc}")
            return
        header = exc.header or b""
        self._reject(exc.reason, header)
        if isinstance(exc, DataDigestError) and len(header) >= 20 and header[0] & 0x3F == 0x05:
            # a Data-Out lost to a digest error: ERL 0 cannot ask for it again, so end the
            # task with PROTOCOL SERVICE CRC ERROR (RFC 7143 7.8) instead of leaving it hanging
            task = self.tasks.get(int.from_bytes(header[16:20], "big"))
            if task is not None and task.state is TaskState.RECEIVING:
                self.transfer.end_task(task, CRC_ERROR)

    def connection_lost(self) -> list[int]:
        """The socket is gone: forget everything; return the ITTs the host must cancel."""
        running = [t.itt for t in self.tasks.values() if t.state is TaskState.EXECUTING]
        self.tasks.clear()
        self.held.clear()
        self.transfer.clear()
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
                self.close("initiator did not answer NOP-In ping")
            return
        if now - self.last_rx >= self.ping_interval:
            self._ping_ttt = self.new_ttt()
            self._ping_sent = now
            self.send(
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
        self.send(
            p.AsyncMessage(
                lun=0,
                statsn=self.status_sn(),
                expcmdsn=s.exp_cmd_sn,
                maxcmdsn=s.max_cmd_sn,
                async_event=p.AsyncEvent.LOGOUT_REQUESTED,
                parameter3=within,
            )
        )

    # --- errors ---------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CLOSED
            self._events.append(CloseConnection(reason))

    def _reject(self, reason: int, header: Buffer) -> None:
        self.send(
            p.Reject(
                reason=reason,
                statsn=self.status_sn(),
                expcmdsn=self.exp_cmd_sn,
                maxcmdsn=self.max_cmd_sn,
                header=bytes(header),
            )
        )

    def protocol_error(
        self, pdu: p.Pdu, why: str, reason: int = RejectReason.PROTOCOL_ERROR
    ) -> None:
        """RFC 7143 7.? at ERL 0: reject the PDU, then end the connection (session recovery)."""
        self._reject(reason, _header_of(pdu))
        self.close(why)

    # --- login ----------------------------------------------------------------------------

    def _on_login_pdu(self, pdu: p.Pdu) -> None:
        if not isinstance(pdu, p.LoginRequest):
            self.close(f"{type(pdu).__name__} before login completed")
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
        resp.statsn = self.status_sn()
        resp.expcmdsn = pdu.cmdsn
        resp.maxcmdsn = sn_add(pdu.cmdsn, self.queue_depth - 1)
        self.send(resp)
        if reply.done and status is not LoginStatus.SUCCESS:
            if status.status_class >= 2:
                self.login_failure = status
            self.close(f"login failed: {status.name} {why}")

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
        # digests start with the first PDU after the final Login Response (RFC 7143 13.1);
        # the initiator's next PDU already carries them
        self._digests_after_login = (conn_params.header_digest, conn_params.data_digest)
        reader = self.reader
        reader.header_digest = conn_params.header_digest
        reader.data_digest = conn_params.data_digest
        reader.max_recv_data_segment_length = conn_params.max_recv_data_segment_length
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
            if cmd_sn in self.held:
                return None  # a duplicate of one already waiting
            self.held[cmd_sn] = item
            return False
        return None

    def drain(self) -> None:
        """Deliver every held PDU whose turn has come."""
        s = self.session
        assert s is not None
        held = self.held
        while held and s.exp_cmd_sn in held:
            item = held.pop(s.exp_cmd_sn)
            s.exp_cmd_sn = sn_add(s.exp_cmd_sn, 1)
            if item is _TOMBSTONE:
                self.release_slot()
            elif isinstance(item, Task):
                item.delivered = True
                self.maybe_execute(item)
            elif isinstance(item, _Held):
                self._FFP_ORDERED[type(item.pdu)](self, item.pdu)

    def release_slot(self) -> None:
        """A non-immediate PDU is answered: the window may slide (MaxCmdSN never decreases)."""
        s = self.session
        assert s is not None
        s.max_cmd_sn = sn_add(s.max_cmd_sn, 1)

    def ordered(self, pdu: Any) -> bool:
        """For NOP-Out/Text/TMF/Logout: True to process now; else held or dropped."""
        ok = self._accept_sn(pdu.cmdsn, pdu.immediate, _Held(pdu))
        return bool(ok)

    def done_ordered(self, pdu: Any) -> None:
        if not pdu.immediate:
            self.release_slot()

    # --- SCSI commands --------------------------------------------------------------------

    def _on_scsi_command(self, pdu: p.ScsiCommand) -> None:
        s = self.session
        assert s is not None
        if s.session_type is SessionType.DISCOVERY:
            self.protocol_error(pdu, "SCSI command in a discovery session")
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
            self.protocol_error(pdu, error)
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
        self.transfer.start(task, pdu)
        if placed:
            self.maybe_execute(task)
            if self.held:
                self.drain()

    # --- the command fast path -----------------------------------------------------------

    def _fast_command(self, buf: memoryview, start: int, dlen: int) -> bool:
        """Answer a SCSI Command PDU straight from its frame when that is exactly what the
        full path would do: READ/WRITE(10)/(16), F bit set, all write data immediate, next in
        CmdSN order with nothing held, queued or running, a plain lane for its LUN (the SCSI
        layer's `FastLane.admit`: no unit attention, reservation conflict, ...) and EDTL
        equal to the CDB's transfer length (no residuals). The I/O runs inline against the
        device; the answer is packed with one precompiled struct. Returns False, having
        changed nothing, for everything else: the caller decodes the PDU and takes the full
        path (docs/iscsi-protocol.md, "Fast path")."""
        op = buf[32]
        write = op in _FAST_WRITE
        layout = _FAST_WRITE[op] if write else _FAST_READ.get(op)
        if layout is None:
            return False
        if self.tasks or self.held or self._events or self.on_pdu is not None:
            return False
        b0, b1, _, lun, itt, edtl, cmdsn, _, flags, lba, a, b, control = layout.unpack_from(buf)
        if layout is _CMD10:
            group, blocks = a, b
        else:
            blocks, group = a, b
        # F, R/W as the opcode says, a defined task attribute; CDB reserved bits clear (the
        # usage masks of sbc.py: byte 1 0x1E, group 0x1F, control 0x00); no FUA on a write
        if (
            b1 & 0xE0 != (0xA0 if write else 0xC0)
            or b1 & 0x07 > 4
            or flags & 0xE1
            or group & 0xE0
            or control
            or (write and flags & 0x08)
        ):
            return False
        s = self.session
        assert s is not None
        immediate = b0 == 0x41
        if not immediate and (cmdsn != s.exp_cmd_sn or cmdsn == (s.max_cmd_sn + 1) & 0xFFFFFFFF):
            return False
        lane = self._lanes.get(lun)
        if lane is None or not lane.plain:
            number = p.lun_number(lun)
            if number is None or self.fast_lanes is None:
                return False
            lane = self._lanes[lun] = self.fast_lanes(s.nexus, number)
            if lane is None:
                return False
        n = lane.admit(lba, blocks, write)
        if not n or n != edtl:
            return False
        data: Buffer = b""
        try:
            if write:
                params = self.params
                if (
                    dlen != n
                    or not params.immediate_data
                    or n > params.first_burst_length
                    or n > self.transfer.max_write_length
                ):
                    return False
                lane.inline.write_inline(lba, buf[start : start + n])  # type: ignore[union-attr]
            else:
                if dlen:
                    return False
                data = lane.inline.read_inline(lba, blocks)  # type: ignore[union-attr]
        except Exception:  # BlockDeviceError, or a device bug: never out of receive_data
            return False  # the full path runs it again and reports the error as sense
        # done: the sequence numbers move as the full path moves them
        if not immediate:
            s.exp_cmd_sn = (cmdsn + 1) & 0xFFFFFFFF
            s.max_cmd_sn = (s.max_cmd_sn + 1) & 0xFFFFFFFF
        statsn = self.stat_sn
        self.stat_sn = (statsn + 1) & 0xFFFFFFFF
        self.fast_commands += 1
        exp = s.exp_cmd_sn
        mx = s.max_cmd_sn
        out = self._out
        hd = self.header_digest
        if write:
            header = _RESPONSE.pack(0x21, 0x80, 0, 0, 0, 0, itt, 0, statsn, exp, mx, 0, 0, 0)
            out.append(header + crc32c(header).to_bytes(4, "little") if hd else header)
            return True
        seg = self.max_xmit
        burst = self.params.max_burst_length
        dd = self.data_digest
        if n <= seg and n <= burst and not hd and not dd:
            # the common small read: one Data-In carrying the status
            out.append(
                _DATA_IN.pack(0x25, 0x81, 0, n, lun, itt, 0xFFFFFFFF, statsn, exp, mx, 0, 0, 0)
            )
            out.append(data)
            return True
        view = data if isinstance(data, memoryview) else memoryview(data)
        offset = 0
        data_sn = 0
        while offset < n:
            end = offset + min(seg, n - offset, burst - offset % burst)
            if end == n:
                header = _DATA_IN.pack(
                    0x25, 0x81, 0, end - offset, lun, itt, 0xFFFFFFFF, statsn, exp, mx,
                    data_sn, offset, 0,
                )  # fmt: skip
            else:
                header = _DATA_IN.pack(
                    0x25, 0x80 if end % burst == 0 else 0, 0, end - offset, lun, itt,
                    0xFFFFFFFF, 0, exp, mx, data_sn, offset, 0,
                )  # fmt: skip
            piece = view[offset:end]
            if hd:
                header += crc32c(header).to_bytes(4, "little")
            out.append(header)
            out.append(piece)
            if dd:  # block-sized pieces: never padded
                out.append(crc32c(piece).to_bytes(4, "little"))
            offset = end
            data_sn += 1
        return True

    def _consume_sn(self, pdu: Any) -> bool | None:
        """A PDU we answer without processing still uses up its CmdSN (and releases it)."""
        placed = self._accept_sn(pdu.cmdsn, pdu.immediate, _TOMBSTONE)
        if placed and not pdu.immediate:
            self.release_slot()
            self.drain()
        return placed

    def maybe_execute(self, task: Task) -> None:
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

    def command_done(self, itt: int, result: ScsiResult) -> None:
        """The SCSI layer finished `itt`: queue Data-In and/or the SCSI Response."""
        task = self.tasks.pop(itt, None)
        if task is None or self.phase is not Phase.FULL_FEATURE:
            return  # aborted meanwhile: no response (RFC 7143 4.2.3.3)
        if not task.immediate:
            self.release_slot()
        self.transfer.complete(task, result)

    # --- NOP ------------------------------------------------------------------------------

    def _on_nop_out(self, pdu: p.NopOut) -> None:
        if pdu.itt == RESERVED:
            # the answer to our ping (or an initiator's unsolicited "ping", which needs no
            # answer); RFC 7143 11.18: must be immediate
            if pdu.ttt != RESERVED and pdu.ttt == self._ping_ttt:
                self._ping_sent = None
            if not pdu.immediate:
                self.protocol_error(pdu, "NOP-Out without ITT must be immediate")
            return
        if pdu.ttt != RESERVED:
            self.protocol_error(
                pdu, "NOP-Out with both ITT and TTT", RejectReason.INVALID_PDU_FIELD
            )
            return
        if self.ordered(pdu):
            self._answer_nop(pdu)
            self.drain()

    def _answer_nop(self, pdu: p.NopOut) -> None:
        self.done_ordered(pdu)
        s = self.session
        assert s is not None
        data = pdu.data[: self.max_xmit]
        self.send(
            p.NopIn(
                lun=pdu.lun,
                itt=pdu.itt,
                ttt=RESERVED,
                statsn=self.status_sn(),
                expcmdsn=s.exp_cmd_sn,
                maxcmdsn=s.max_cmd_sn,
                data=bytes(data),
            )
        )

    # --- Text (full feature phase) --------------------------------------------------------

    def _on_text(self, pdu: p.TextRequest) -> None:
        if self.ordered(pdu):
            self._answer_text(pdu)
            self.drain()

    def _answer_text(self, pdu: p.TextRequest) -> None:
        self.done_ordered(pdu)
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
                ttt = self.new_ttt()
                self._text_in = (pdu.itt, ttt, text)
                self.send(
                    p.TextResponse(
                        final=False,
                        lun=pdu.lun,
                        itt=pdu.itt,
                        ttt=ttt,
                        statsn=self.status_sn(),
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
            ttt = self._text_ttt = self.new_ttt()
            self._text_pending = (pdu.itt, rest)
        else:
            self._text_pending = None
        self.send(
            p.TextResponse(
                final=not more,
                cont=more,
                lun=pdu.lun,
                itt=pdu.itt,
                ttt=ttt,
                statsn=self.status_sn(),
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
        if self.ordered(pdu):
            self._answer_logout(pdu)

    def _answer_logout(self, pdu: p.LogoutRequest) -> None:
        self.done_ordered(pdu)
        s = self.session
        assert s is not None
        if pdu.reason == p.LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY:
            code = p.LogoutResponseCode.RECOVERY_NOT_SUPPORTED
        elif pdu.reason == p.LogoutReason.CLOSE_CONNECTION and pdu.cid != self.cid:
            code = p.LogoutResponseCode.CID_NOT_FOUND
        else:
            code = p.LogoutResponseCode.CLOSED_SUCCESSFULLY
        self.send(
            p.LogoutResponse(
                response=code,
                itt=pdu.itt,
                statsn=self.status_sn(),
                expcmdsn=s.exp_cmd_sn,
                maxcmdsn=s.max_cmd_sn,
            )
        )
        if code == p.LogoutResponseCode.CLOSED_SUCCESSFULLY:
            self.phase = Phase.LOGGED_OUT
            self._events.append(CloseConnection("logout"))
        else:
            self.drain()

    # --- Task management (tmf.py) ---------------------------------------------------------

    def abort_tasks(self, lun: int | None) -> list[int]:
        """For another session's LU/target reset: drop our tasks on `lun` (None: all); return
        the ITTs the host must cancel."""
        if self.phase is not Phase.FULL_FEATURE:
            return []
        return self.tmf.abort_tasks(lun)

    def tmf_done(self, itt: int, response: TmfResponse) -> None:
        """The host finished the `TaskManagement` of request `itt`."""
        self.tmf.done(itt, response)

    # --- SNACK ----------------------------------------------------------------------------

    def _on_snack(self, pdu: p.SnackRequest) -> None:
        # ErrorRecoveryLevel=0: SNACK is not supported (RFC 7143 11.16)
        self._reject(RejectReason.PROTOCOL_ERROR, _header_of(pdu))

    _FFP: dict[type, Callable[[TargetConnection, Any], None]] = {
        p.ScsiCommand: _on_scsi_command,
        p.DataOut: lambda self, pdu: self.transfer.on_data_out(pdu),
        p.NopOut: _on_nop_out,
        p.TextRequest: _on_text,
        p.LogoutRequest: _on_logout,
        p.TaskManagementRequest: lambda self, pdu: self.tmf.on_request(pdu),
        p.SnackRequest: _on_snack,
    }
    _FFP_ORDERED: dict[type, Callable[[TargetConnection, Any], None]] = {
        p.NopOut: _answer_nop,
        p.TextRequest: _answer_text,
        p.LogoutRequest: _answer_logout,
        p.TaskManagementRequest: lambda self, pdu: self.tmf.answer(pdu),
    }


_ATTRIBUTES = {a.value: a for a in TaskAttribute}


def _attribute(attr: int) -> TaskAttribute:
    """The task attribute (reserved values read as SIMPLE); a dict, not an Enum call, since
    every command goes through here."""
    return _ATTRIBUTES.get(attr, TaskAttribute.SIMPLE)


def _header_of(pdu: p.Pdu) -> bytes:
    """The 48-byte header of a received PDU, for the Reject data segment."""
    return bytes(p.encode_pdu(pdu)[0][: p.BHS_LENGTH])
