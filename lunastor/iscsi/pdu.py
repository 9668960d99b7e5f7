"""iSCSI PDU codec (RFC 7143 section 11), sans-IO.

Every PDU is a 48-byte Basic Header Segment (BHS), optional Additional Header Segments (AHS),
an optional header digest, an optional data segment padded to 4 bytes and an optional data
digest. One slotted dataclass per PDU type; fields are named after the RFC in snake_case and
hold raw wire values (LUN as the 64-bit field, see `lun_number` / `lun_field`).

    decode_pdu(header, ahs, data) -> Pdu        # one PDU whose segments are already split
    encode_pdu(pdu, header_digest, data_digest) -> list of buffers for transport.writelines
    PduReader                                   # splits a byte stream into PDUs

Data segments are never copied: decoded PDUs hold memoryviews into the received buffer and
encoding returns the caller's data object as one of the output buffers.

Every BHS is handled through one precompiled layout, `>BBBBIQ8I`: bytes 0-3, the word holding
TotalAHSLength and DataSegmentLength, the 8-byte LUN/ISID field, then eight 32-bit words for
bytes 16-47. Sub-word fields (CID, Time2Wait, status class/detail...) are shifted out of
those words, which is cheaper than one struct per PDU type.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Literal

from crc32c import crc32c

from lunastor.iscsi.errors import (
    DataDigestError,
    FramingError,
    HeaderDigestError,
    LocalProtocolError,
    LoginStatus,
    RejectReason,
    RemoteProtocolError,
)
from lunastor.iscsi.text import encode_text as encode_text  # re-exported: part of the codec API
from lunastor.iscsi.text import parse_text as parse_text

Buffer = bytes | bytearray | memoryview

BHS_LENGTH = 48
RESERVED_TAG = 0xFFFFFFFF  # "no task tag" / "no transfer tag"
MAX_DATA_SEGMENT_LENGTH = 0xFFFFFF  # 24-bit DataSegmentLength
MAX_AHS_LENGTH = 255 * 4  # 8-bit TotalAHSLength in 4-byte words

_BHS = struct.Struct(">BBBBIQ8I")
_SCSI_CMD = struct.Struct(">BBBBIQIIII16s")
_AHS_HDR = struct.Struct(">HBB")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")  # indexed by length % 4
_EMPTY = memoryview(b"")


class Opcode(IntEnum):
    """Every opcode of RFC 7143 10.2.1.2 (initiator: 0x00-0x1f, target: 0x20-0x3f)."""

    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MANAGEMENT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    SCSI_DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    VENDOR_INITIATOR_1C = 0x1C
    VENDOR_INITIATOR_1D = 0x1D
    VENDOR_INITIATOR_1E = 0x1E
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MANAGEMENT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    SCSI_DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    VENDOR_TARGET_3C = 0x3C
    VENDOR_TARGET_3D = 0x3D
    VENDOR_TARGET_3E = 0x3E
    REJECT = 0x3F


class TaskAttribute(IntEnum):
    """SCSI Command ATTR field (RFC 7143 11.3.1.3); 5-7 are reserved."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


class TmfFunction(IntEnum):
    """Task Management Function Request codes (RFC 7143 11.5.1)."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(IntEnum):
    """Task Management Function Response codes (RFC 7143 11.6.1)."""

    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    TASK_REASSIGNMENT_NOT_SUPPORTED = 4
    FUNCTION_NOT_SUPPORTED = 5
    FUNCTION_AUTHORIZATION_FAILED = 6
    FUNCTION_REJECTED = 255


class LogoutReason(IntEnum):
    """Logout Request reason codes (RFC 7143 11.14.1)."""

    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_CONNECTION_FOR_RECOVERY = 2


class LogoutResponseCode(IntEnum):
    """Logout Response codes (RFC 7143 11.15.1)."""

    CLOSED_SUCCESSFULLY = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


class SnackType(IntEnum):
    """SNACK Request types (RFC 7143 11.16.1)."""

    DATA_R2T = 0
    STATUS = 1
    DATA_ACK = 2
    R_DATA = 3


class AsyncEvent(IntEnum):
    """Asynchronous Message AsyncEvent codes (RFC 7143 11.9.1)."""

    SCSI_ASYNC_EVENT = 0
    LOGOUT_REQUESTED = 1
    CONNECTION_DROP = 2
    SESSION_DROP = 3
    NEGOTIATION_REQUEST = 4
    TASK_TERMINATION = 5
    VENDOR_SPECIFIC = 255


class Stage(IntEnum):
    """Login stages, CSG/NSG (RFC 7143 11.12.3); 2 is reserved."""

    SECURITY_NEGOTIATION = 0
    LOGIN_OPERATIONAL_NEGOTIATION = 1
    FULL_FEATURE_PHASE = 3


class AhsType(IntEnum):
    EXTENDED_CDB = 1
    BIDIRECTIONAL_READ_LENGTH = 2


# --- LUN helpers (SAM-5 4.7: single-level peripheral and flat space addressing) --------------


def lun_number(lun: int) -> int | None:
    """The flat LUN number a 64-bit LUN field addresses, or None if we cannot address it.

    Peripheral device addressing (method 00b, bus 0) covers 0-255; flat space addressing
    (method 01b) covers 0-16383. Anything else (other buses, hierarchical levels, logical
    unit or extended addressing such as well-known LUNs) is None: the SCSI layer answers
    LOGICAL UNIT NOT SUPPORTED.
    """
    if lun & 0x0000FFFFFFFFFFFF:
        return None  # a second level, or garbage, in bytes 2-7
    top = lun >> 48
    method = top >> 14
    if method == 1:
        return top & 0x3FFF
    if method == 0 and top >> 8 == 0:
        return top & 0xFF
    return None


def lun_field(number: int) -> int:
    """The 64-bit LUN field for a flat LUN number, as Linux and libiscsi encode it."""
    if not 0 <= number <= 0x3FFF:
        raise LocalProtocolError(f"LUN {number} cannot be encoded (0-16383)")
    if number < 256:
        return number << 48
    return (0x4000 | number) << 48


# --- PDU types --------------------------------------------------------------------------------


class Pdu:
    """Base of every PDU dataclass. `opcode` is the class's opcode."""

    __slots__ = ()
    opcode: ClassVar[Opcode]

    def _encode(self) -> tuple[bytes, Buffer]:  # pragma: no cover - every subclass overrides
        raise NotImplementedError


def _lens(ahs_words: int, data: Buffer) -> int:
    n = len(data)
    if n > MAX_DATA_SEGMENT_LENGTH:
        raise LocalProtocolError(f"data segment of {n} bytes exceeds 2**24-1")
    return ahs_words << 24 | n


@dataclass(slots=True)
class NopOut(Pdu):
    opcode: ClassVar[Opcode] = Opcode.NOP_OUT
    immediate: bool = False
    lun: int = 0
    itt: int = RESERVED_TAG
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0
    data: Buffer = b""

    def _encode(self) -> tuple[bytes, Buffer]:
        bhs = _BHS.pack(
            0x40 if self.immediate else 0x00,
            0x80,
            0,
            0,
            _lens(0, self.data),
            self.lun,
            self.itt,
            self.ttt,
            self.cmdsn,
            self.expstatsn,
            0,
            0,
            0,
            0,
        )
        return bhs, self.data


@dataclass(slots=True)
class ScsiCommand(Pdu):
    """SCSI Command (11.3). `cdb` is the full CDB: the 16-byte field plus any extended CDB AHS."""

    opcode: ClassVar[Opcode] = Opcode.SCSI_COMMAND
    immediate: bool = False
    final: bool = True
    read: bool = False
    write: bool = False
    attr: int = TaskAttribute.SIMPLE
    lun: int = 0
    itt: int = 0
    expected_data_transfer_length: int = 0
    cmdsn: int = 0
    expstatsn: int = 0
    cdb: bytes = bytes(16)
    bidi_expected_read_length: int | None = None  # Bidirectional Read-Data Length AHS
    data: Buffer = b""

    def _encode(self) -> tuple[bytes, Buffer]:
        cdb = self.cdb
        ahs = b""
        if len(cdb) > 16:
            ext = cdb[16:]
            rec = _AHS_HDR.pack(len(ext) + 1, AhsType.EXTENDED_CDB, 0) + ext
            ahs = rec + _PAD[len(rec) % 4]
            cdb = cdb[:16]
        elif len(cdb) < 16:
            cdb = cdb + bytes(16 - len(cdb))
        if self.bidi_expected_read_length is not None:
            ahs += _AHS_HDR.pack(5, AhsType.BIDIRECTIONAL_READ_LENGTH, 0) + _U32.pack(
                self.bidi_expected_read_length
            )
        if len(ahs) > MAX_AHS_LENGTH:
            raise LocalProtocolError(f"CDB of {len(self.cdb)} bytes does not fit the AHS")
        bhs = _SCSI_CMD.pack(
            0x41 if self.immediate else 0x01,
            (0x80 if self.final else 0)
            | (0x40 if self.read else 0)
            | (0x20 if self.write else 0)
            | self.attr,
            0,
            0,
            _lens(len(ahs) >> 2, self.data),
            self.lun,
            self.itt,
            self.expected_data_transfer_length,
            self.cmdsn,
            self.expstatsn,
            cdb,
        )
        return (bhs + ahs if ahs else bhs), self.data


@dataclass(slots=True)
class TaskManagementRequest(Pdu):
    opcode: ClassVar[Opcode] = Opcode.TASK_MANAGEMENT_REQUEST
    immediate: bool = True
    function: int = TmfFunction.ABORT_TASK  # raw 7-bit code; unknown ones get FUNCTION_REJECTED
    lun: int = 0
    itt: int = 0
    referenced_task_tag: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0
    ref_cmdsn: int = 0
    exp_data_sn: int = 0

    def _encode(self) -> tuple[bytes, Buffer]:
        bhs = _BHS.pack(
            0x42 if self.immediate else 0x02,
            0x80 | self.function,
            0,
            0,
            0,
            self.lun,
            self.itt,
            self.referenced_task_tag,
            self.cmdsn,
            self.expstatsn,
            self.ref_cmdsn,
            self.exp_data_sn,
            0,
            0,
        )
        return bhs, b""


@dataclass(slots=True)
class LoginRequest(Pdu):
    """Login Request (11.12); the I bit is always set on the wire."""

    opcode: ClassVar[Opcode] = Opcode.LOGIN_REQUEST
    transit: bool = False
    cont: bool = False
    csg: int = Stage.SECURITY_NEGOTIATION
    nsg: int = Stage.SECURITY_NEGOTIATION
    version_max: int = 0
    version_min: int = 0
    isid: int = 0  # 48-bit
    tsih: int = 0
    itt: int = 0
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0
    data: Buffer = b""

    def _encode(self) -> tuple[bytes, Buffer]:
        if self.isid >> 48:
            raise LocalProtocolError("ISID is 48 bits")
        bhs = _BHS.pack(
            0x43,
            _login_flags(self.transit, self.cont, self.csg, self.nsg),
            self.version_max,
            self.version_min,
            _lens(0, self.data),
            self.isid << 16 | self.tsih,
            self.itt,
            self.cid << 16,
            self.cmdsn,
            self.expstatsn,
            0,
            0,
            0,
            0,
        )
        return bhs, self.data


@dataclass(slots=True)
class TextRequest(Pdu):
    opcode: ClassVar[Opcode] = Opcode.TEXT_REQUEST
    immediate: bool = False
    final: bool = True
    cont: bool = False
    lun: int = 0
    itt: int = 0
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0
    data: Buffer = b""

    def _encode(self) -> tuple[bytes, Buffer]:
        bhs = _BHS.pack(
            0x44 if self.immediate else 0x04,
            (0x80 if self.final else 0) | (0x40 if self.cont else 0),
            0,
            0,
            _lens(0, self.data),
            self.lun,
            self.itt,
            self.ttt,
            self.cmdsn,
            self.expstatsn,
            0,
            0,
            0,
            0,
        )
        return bhs, self.data


@dataclass(slots=True)
class DataOut(Pdu):
    opcode: ClassVar[Opcode] = Opcode.SCSI_DATA_OUT
    final: bool = False
    lun: int = 0
    itt: int = 0
    ttt: int = RESERVED_TAG
    expstatsn: int = 0
    data_sn: int = 0
    buffer_offset: int = 0
    data: Buffer = b""

    def _encode(self) -> tuple[bytes, Buffer]:
        bhs = _BHS.pack(
            0x05,
            0x80 if self.final else 0,
            0,
            0,
            _lens(0, self.data),
            self.lun,
            self.itt,
            self.ttt,
            0,
            self.expstatsn,
            0,
            self.data_sn,
            self.buffer_offset,
            0,
        )
        return bhs, self.data


@dataclass(slots=True)
class LogoutRequest(Pdu):
    opcode: ClassVar[Opcode] = Opcode.LOGOUT_REQUEST
    immediate: bool = False
    reason: int = LogoutReason.CLOSE_SESSION
    itt: int = 0
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0

    def _encode(self) -> tuple[bytes, Buffer]:
        bhs = _BHS.pack(
            0x46 if self.immediate else 0x06,
            0x80 | self.reason,
            0,
            0,
            0,
            0,
            self.itt,
            self.cid << 16,
            self.cmdsn,
            self.expstatsn,
            0,
            0,
            0,
            0,
        )
        return bhs, b""


@dataclass(slots=True)
class SnackRequest(Pdu):
    opcode: ClassVar[Opcode] = Opcode.SNACK_REQUEST
    snack_type: int = SnackType.DATA_R2T
    lun: int = 0
    itt: int = RESERVED_TAG
    ttt: int = RESERVED_TAG  # or SNACK Tag for R-Data SNACK
    expstatsn: int = 0
    begrun: int = 0
    run_length: int = 0

    def _encode(self) -> tuple[bytes, Buffer]:
        bhs = _BHS.pack(
            0x10,
            0x80 | self.snack_type,
            0,
            0,
            0,
            self.lun,
            self.itt,
            self.ttt,
            0,
            self.expstatsn,
            0,
            0,
            self.begrun,
            self.run_length,
        )
        return bhs, b""


@dataclass(slots=True)
class NopIn(Pdu):
    opcode: ClassVar[Opcode] = Opcode.NOP_IN
    lun: int = 0
    itt: int = RESERVED_TAG
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    data: Buffer = b""

    def _encode(self) -> tuple[bytes, Buffer]:
        bhs = _BHS.pack(
            0x20,
            0x80,
            0,
            0,
            _lens(0, self.data),
            self.lun,
            self.itt,
            self.ttt,
            self.statsn,
            self.expcmdsn,
            self.maxcmdsn,
            0,
            0,
            0,
        )
        return bhs, self.data


@dataclass(slots=True)
class ScsiResponse(Pdu):
    """SCSI Response (11.4). The data segment is SenseLength + `sense` + `response_data`."""

    opcode: ClassVar[Opcode] = Opcode.SCSI_RESPONSE
    bidi_overflow: bool = False  # o
    bidi_underflow: bool = False  # u
    overflow: bool = False  # O
    underflow: bool = False  # U
    response: int = 0  # 0 = command completed at target
    status: int = 0  # SCSI status
    itt: int = 0
    snack_tag: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    exp_data_sn: int = 0
    bidi_residual_count: int = 0
    residual_count: int = 0
    sense: Buffer = b""
    response_data: Buffer = b""

    def _encode(self) -> tuple[bytes, Buffer]:
        data: Buffer = b""
        if self.sense or self.response_data:
            if len(self.sense) > 0xFFFF:
                raise LocalProtocolError("sense data longer than 65535 bytes")
            data = _U16.pack(len(self.sense)) + bytes(self.sense) + bytes(self.response_data)
        bhs = _BHS.pack(
            0x21,
            0x80
            | (0x10 if self.bidi_overflow else 0)
            | (0x08 if self.bidi_underflow else 0)
            | (0x04 if self.overflow else 0)
            | (0x02 if self.underflow else 0),
            self.response,
            self.status,
            _lens(0, data),
            0,
            self.itt,
            self.snack_tag,
            self.statsn,
            self.expcmdsn,
            self.maxcmdsn,
            self.exp_data_sn,
            self.bidi_residual_count,
            self.residual_count,
        )
        return bhs, data


@dataclass(slots=True)
class TaskManagementResponse(Pdu):
    opcode: ClassVar[Opcode] = Opcode.TASK_MANAGEMENT_RESPONSE
    response: int = TmfResponse.FUNCTION_COMPLETE
    itt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0

    def _encode(self) -> tuple[bytes, Buffer]:
        bhs = _BHS.pack(
            0x22,
            0x80,
            self.response,
            0,
            0,
            0,
            self.itt,
            0,
            self.statsn,
            self.expcmdsn,
            self.maxcmdsn,
            0,
            0,
            0,
        )
        return bhs, b""


@dataclass(slots=True)
class LoginResponse(Pdu):
    opcode: ClassVar[Opcode] = Opcode.LOGIN_RESPONSE
    transit: bool = False
    cont: bool = False
    csg: int = Stage.SECURITY_NEGOTIATION
    nsg: int = Stage.SECURITY_NEGOTIATION
    version_max: int = 0
    version_active: int = 0
    isid: int = 0
    tsih: int = 0
    itt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    status_class: int = 0
    status_detail: int = 0
    data: Buffer = b""

    def _encode(self) -> tuple[bytes, Buffer]:
        if self.isid >> 48:
            raise LocalProtocolError("ISID is 48 bits")
        if self.status_class > 0xFF or self.status_detail > 0xFF:
            raise LocalProtocolError("status class/detail are one byte each")
        bhs = _BHS.pack(
            0x23,
            _login_flags(self.transit, self.cont, self.csg, self.nsg),
            self.version_max,
            self.version_active,
            _lens(0, self.data),
            self.isid << 16 | self.tsih,
            self.itt,
            0,
            self.statsn,
            self.expcmdsn,
            self.maxcmdsn,
            self.status_class << 24 | self.status_detail << 16,
            0,
            0,
        )
        return bhs, self.data


@dataclass(slots=True)
class TextResponse(Pdu):
    opcode: ClassVar[Opcode] = Opcode.TEXT_RESPONSE
    final: bool = True
    cont: bool = False
    lun: int = 0
    itt: int = 0
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    data: Buffer = b""

    def _encode(self) -> tuple[bytes, Buffer]:
        bhs = _BHS.pack(
            0x24,
            (0x80 if self.final else 0) | (0x40 if self.cont else 0),
            0,
            0,
            _lens(0, self.data),
            self.lun,
            self.itt,
            self.ttt,
            self.statsn,
            self.expcmdsn,
            self.maxcmdsn,
            0,
            0,
            0,
        )
        return bhs, self.data


@dataclass(slots=True)
class DataIn(Pdu):
    """SCSI Data-In (11.7). `status_present` is the S bit; `status`/`statsn` are valid with it."""

    opcode: ClassVar[Opcode] = Opcode.SCSI_DATA_IN
    final: bool = False
    ack: bool = False  # A
    overflow: bool = False  # O
    underflow: bool = False  # U
    status_present: bool = False  # S
    status: int = 0
    lun: int = 0
    itt: int = 0
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    data_sn: int = 0
    buffer_offset: int = 0
    residual_count: int = 0
    data: Buffer = b""

    def _encode(self) -> tuple[bytes, Buffer]:
        data = self.data
        n = len(data)
        if n > MAX_DATA_SEGMENT_LENGTH:
            raise LocalProtocolError(f"data segment of {n} bytes exceeds 2**24-1")
        bhs = _BHS.pack(
            0x25,
            (0x80 if self.final else 0)
            | (0x40 if self.ack else 0)
            | (0x04 if self.overflow else 0)
            | (0x02 if self.underflow else 0)
            | (0x01 if self.status_present else 0),
            0,
            self.status,
            n,
            self.lun,
            self.itt,
            self.ttt,
            self.statsn,
            self.expcmdsn,
            self.maxcmdsn,
            self.data_sn,
            self.buffer_offset,
            self.residual_count,
        )
        return bhs, data


@dataclass(slots=True)
class LogoutResponse(Pdu):
    opcode: ClassVar[Opcode] = Opcode.LOGOUT_RESPONSE
    response: int = LogoutResponseCode.CLOSED_SUCCESSFULLY
    itt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    time2wait: int = 0
    time2retain: int = 0

    def _encode(self) -> tuple[bytes, Buffer]:
        if self.time2wait > 0xFFFF or self.time2retain > 0xFFFF:
            raise LocalProtocolError("Time2Wait/Time2Retain are 16 bits")
        bhs = _BHS.pack(
            0x26,
            0x80,
            self.response,
            0,
            0,
            0,
            self.itt,
            0,
            self.statsn,
            self.expcmdsn,
            self.maxcmdsn,
            0,
            self.time2wait << 16 | self.time2retain,
            0,
        )
        return bhs, b""


@dataclass(slots=True)
class R2T(Pdu):
    opcode: ClassVar[Opcode] = Opcode.R2T
    lun: int = 0
    itt: int = 0
    ttt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    r2t_sn: int = 0
    buffer_offset: int = 0
    desired_data_transfer_length: int = 0

    def _encode(self) -> tuple[bytes, Buffer]:
        bhs = _BHS.pack(
            0x31,
            0x80,
            0,
            0,
            0,
            self.lun,
            self.itt,
            self.ttt,
            self.statsn,
            self.expcmdsn,
            self.maxcmdsn,
            self.r2t_sn,
            self.buffer_offset,
            self.desired_data_transfer_length,
        )
        return bhs, b""


@dataclass(slots=True)
class AsyncMessage(Pdu):
    """Asynchronous Message (11.9); data segment is SenseLength + `sense` + `event_data`."""

    opcode: ClassVar[Opcode] = Opcode.ASYNC_MESSAGE
    lun: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    async_event: int = AsyncEvent.SCSI_ASYNC_EVENT
    async_vcode: int = 0
    parameter1: int = 0
    parameter2: int = 0
    parameter3: int = 0
    sense: Buffer = b""
    event_data: Buffer = b""

    def _encode(self) -> tuple[bytes, Buffer]:
        if max(self.async_event, self.async_vcode) > 0xFF:
            raise LocalProtocolError("AsyncEvent/AsyncVCode are one byte each")
        if max(self.parameter1, self.parameter2, self.parameter3) > 0xFFFF:
            raise LocalProtocolError("async parameters are 16 bits")
        data: Buffer = b""
        if self.sense or self.event_data:
            if len(self.sense) > 0xFFFF:
                raise LocalProtocolError("sense data longer than 65535 bytes")
            data = _U16.pack(len(self.sense)) + bytes(self.sense) + bytes(self.event_data)
        bhs = _BHS.pack(
            0x32,
            0x80,
            0,
            0,
            _lens(0, data),
            self.lun,
            RESERVED_TAG,
            0,
            self.statsn,
            self.expcmdsn,
            self.maxcmdsn,
            self.async_event << 24 | self.async_vcode << 16 | self.parameter1,
            self.parameter2 << 16 | self.parameter3,
            0,
        )
        return bhs, data


@dataclass(slots=True)
class Reject(Pdu):
    """Reject (11.17); the data segment is the complete header of the rejected PDU."""

    opcode: ClassVar[Opcode] = Opcode.REJECT
    reason: int = RejectReason.PROTOCOL_ERROR
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    data_sn: int = 0  # DataSN/R2TSN for SNACK rejects
    header: Buffer = b""

    def _encode(self) -> tuple[bytes, Buffer]:
        bhs = _BHS.pack(
            0x3F,
            0x80,
            self.reason,
            0,
            _lens(0, self.header),
            0,
            RESERVED_TAG,
            0,
            self.statsn,
            self.expcmdsn,
            self.maxcmdsn,
            self.data_sn,
            0,
            0,
        )
        return bhs, self.header


INITIATOR_PDUS: tuple[type[Pdu], ...] = (
    NopOut,
    ScsiCommand,
    TaskManagementRequest,
    LoginRequest,
    TextRequest,
    DataOut,
    LogoutRequest,
    SnackRequest,
)
TARGET_PDUS: tuple[type[Pdu], ...] = (
    NopIn,
    ScsiResponse,
    TaskManagementResponse,
    LoginResponse,
    TextResponse,
    DataIn,
    LogoutResponse,
    R2T,
    AsyncMessage,
    Reject,
)


def _login_flags(transit: bool, cont: bool, csg: int, nsg: int) -> int:
    if csg not in (0, 1, 3) or nsg not in (0, 1, 3):
        raise LocalProtocolError(f"invalid login stage CSG={csg} NSG={nsg}")
    return (0x80 if transit else 0) | (0x40 if cont else 0) | csg << 2 | nsg


# --- encoding ---------------------------------------------------------------------------------


def encode_pdu(pdu: Pdu, header_digest: bool = False, data_digest: bool = False) -> list[Buffer]:
    """The PDU as buffers for `transport.writelines`: header (+AHS, +digest), data, pad+digest.

    The data segment object is passed through, never copied. Raises LocalProtocolError for
    fields out of range.
    """
    try:
        header, data = pdu._encode()
    except struct.error as exc:
        raise LocalProtocolError(f"{type(pdu).__name__}: field out of range: {exc}") from None
    if header_digest:
        header = header + crc32c(header).to_bytes(4, "little")
    if not data:
        return [header]
    pad = _PAD[len(data) % 4]
    if data_digest:
        digest = crc32c(data)
        if pad:
            digest = crc32c(pad, digest)
        return [header, data, pad + digest.to_bytes(4, "little")]
    if pad:
        return [header, data, pad]
    return [header, data]


# --- decoding ---------------------------------------------------------------------------------


def _bad(
    header: Buffer, message: str, reason: RejectReason = RejectReason.INVALID_PDU_FIELD
) -> RemoteProtocolError:
    return RemoteProtocolError(message, reason=reason, header=bytes(header[:BHS_LENGTH]))


def _no_ahs_or_data(header: Buffer, ahs: Buffer, data: Buffer, name: str) -> None:
    if ahs:
        raise _bad(header, f"{name} carries an AHS")
    if data:
        raise _bad(header, f"{name} carries a data segment")


def _no_ahs(header: Buffer, ahs: Buffer, name: str) -> None:
    if ahs:
        raise _bad(header, f"{name} carries an AHS")


def _decode_nop_out(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    _no_ahs(h, ahs, "NOP-Out")
    b0, _, _, _, _, lun, itt, ttt, cmdsn, expstatsn, _, _, _, _ = _BHS.unpack_from(h)
    return NopOut(
        immediate=bool(b0 & 0x40),
        lun=lun,
        itt=itt,
        ttt=ttt,
        cmdsn=cmdsn,
        expstatsn=expstatsn,
        data=data,
    )


def _parse_command_ahs(h: Buffer, ahs: Buffer, cdb: bytes) -> tuple[bytes, int | None]:
    bidi: int | None = None
    ext: bytes | None = None
    pos = 0
    end = len(ahs)
    while pos < end:
        if end - pos < 4:
            raise _bad(h, "truncated AHS")
        length, ahs_type, _ = _AHS_HDR.unpack_from(ahs, pos)
        body = pos + 3  # AHSLength counts the byte after AHSType
        stop = body + length
        if stop > end:
            raise _bad(h, "AHS overruns TotalAHSLength")
        if ahs_type == AhsType.EXTENDED_CDB:
            if ext is not None or length < 2:
                raise _bad(h, "bad or repeated extended CDB AHS")
            ext = bytes(ahs[body + 1 : stop])
        elif ahs_type == AhsType.BIDIRECTIONAL_READ_LENGTH:
            if bidi is not None or length != 5:
                raise _bad(h, "bad or repeated bidirectional read length AHS")
            (bidi,) = _U32.unpack_from(ahs, body + 1)
        else:
            raise _bad(h, f"unsupported AHS type {ahs_type}")
        pos = stop + (-(stop - pos) % 4)
    if ext is not None:
        cdb = cdb + ext
    return cdb, bidi


def _decode_scsi_command(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    b0, b1, _, _, _, lun, itt, edtl, cmdsn, expstatsn, cdb = _SCSI_CMD.unpack_from(h)
    attr = b1 & 0x07
    if attr > 4:
        raise _bad(h, f"reserved task attribute {attr}")
    bidi = None
    if ahs:
        cdb, bidi = _parse_command_ahs(h, ahs, cdb)
    # positional: about 40% cheaper than keywords on this hot path (field order matters)
    return ScsiCommand(
        (b0 & 0x40) != 0,
        (b1 & 0x80) != 0,
        (b1 & 0x40) != 0,
        (b1 & 0x20) != 0,
        attr,
        lun,
        itt,
        edtl,
        cmdsn,
        expstatsn,
        cdb,
        bidi,
        data,
    )


def _decode_tmf_request(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    _no_ahs_or_data(h, ahs, data, "Task Management Function Request")
    b0, b1, _, _, _, lun, itt, rtt, cmdsn, expstatsn, refcmdsn, expdatasn, _, _ = _BHS.unpack_from(
        h
    )
    return TaskManagementRequest(
        immediate=bool(b0 & 0x40),
        function=b1 & 0x7F,
        lun=lun,
        itt=itt,
        referenced_task_tag=rtt,
        cmdsn=cmdsn,
        expstatsn=expstatsn,
        ref_cmdsn=refcmdsn,
        exp_data_sn=expdatasn,
    )


def _login_stages(h: Buffer, b1: int) -> tuple[int, int]:
    csg = (b1 >> 2) & 3
    nsg = b1 & 3
    if csg == 2 or (b1 & 0x80 and nsg == 2):
        # reserved stage code: a login failure, not a Reject
        raise RemoteProtocolError(
            "reserved login stage code 2",
            reason=RejectReason.INVALID_PDU_FIELD,
            header=bytes(h[:BHS_LENGTH]),
            login_status=LoginStatus.INITIATOR_ERROR,
        )
    return csg, nsg


def _decode_login_request(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    _no_ahs(h, ahs, "Login Request")
    _, b1, vmax, vmin, _, isid_tsih, itt, cid, cmdsn, expstatsn, _, _, _, _ = _BHS.unpack_from(h)
    csg, nsg = _login_stages(h, b1)
    return LoginRequest(
        transit=bool(b1 & 0x80),
        cont=bool(b1 & 0x40),
        csg=csg,
        nsg=nsg,
        version_max=vmax,
        version_min=vmin,
        isid=isid_tsih >> 16,
        tsih=isid_tsih & 0xFFFF,
        itt=itt,
        cid=cid >> 16,
        cmdsn=cmdsn,
        expstatsn=expstatsn,
        data=data,
    )


def _decode_text_request(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    _no_ahs(h, ahs, "Text Request")
    b0, b1, _, _, _, lun, itt, ttt, cmdsn, expstatsn, _, _, _, _ = _BHS.unpack_from(h)
    return TextRequest(
        immediate=bool(b0 & 0x40),
        final=bool(b1 & 0x80),
        cont=bool(b1 & 0x40),
        lun=lun,
        itt=itt,
        ttt=ttt,
        cmdsn=cmdsn,
        expstatsn=expstatsn,
        data=data,
    )


def _decode_data_out(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    if ahs:
        raise _bad(h, "SCSI Data-Out carries an AHS")
    _, b1, _, _, _, lun, itt, ttt, _, expstatsn, _, datasn, offset, _ = _BHS.unpack_from(h)
    return DataOut((b1 & 0x80) != 0, lun, itt, ttt, expstatsn, datasn, offset, data)  # positional


def _decode_logout_request(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    _no_ahs_or_data(h, ahs, data, "Logout Request")
    b0, b1, _, _, _, _, itt, cid, cmdsn, expstatsn, _, _, _, _ = _BHS.unpack_from(h)
    reason = b1 & 0x7F
    if reason > LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY:
        raise _bad(h, f"reserved logout reason code {reason}")
    return LogoutRequest(
        immediate=bool(b0 & 0x40),
        reason=reason,
        itt=itt,
        cid=cid >> 16,
        cmdsn=cmdsn,
        expstatsn=expstatsn,
    )


def _decode_snack_request(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    _no_ahs_or_data(h, ahs, data, "SNACK Request")
    _, b1, _, _, _, lun, itt, ttt, _, expstatsn, _, _, begrun, runlength = _BHS.unpack_from(h)
    snack_type = b1 & 0x0F
    if snack_type > SnackType.R_DATA:
        raise _bad(h, f"reserved SNACK type {snack_type}")
    return SnackRequest(
        snack_type=snack_type,
        lun=lun,
        itt=itt,
        ttt=ttt,
        expstatsn=expstatsn,
        begrun=begrun,
        run_length=runlength,
    )


def _decode_nop_in(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    _no_ahs(h, ahs, "NOP-In")
    _, _, _, _, _, lun, itt, ttt, statsn, expcmdsn, maxcmdsn, _, _, _ = _BHS.unpack_from(h)
    return NopIn(
        lun=lun,
        itt=itt,
        ttt=ttt,
        statsn=statsn,
        expcmdsn=expcmdsn,
        maxcmdsn=maxcmdsn,
        data=data,
    )


def _split_sense(h: Buffer, data: memoryview, name: str) -> tuple[memoryview, memoryview]:
    if not data:
        return _EMPTY, _EMPTY
    if len(data) < 2:
        raise _bad(h, f"{name} data segment shorter than SenseLength")
    (sense_len,) = _U16.unpack_from(data)
    if 2 + sense_len > len(data):
        raise _bad(h, f"{name} SenseLength {sense_len} overruns the data segment")
    return data[2 : 2 + sense_len], data[2 + sense_len :]


def _decode_scsi_response(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    _no_ahs(h, ahs, "SCSI Response")
    (_, b1, response, status, _, _, itt, snack, statsn, expcmdsn, maxcmdsn, expdatasn, bidi,
     resid) = _BHS.unpack_from(h)  # fmt: skip
    sense, response_data = _split_sense(h, data, "SCSI Response")
    return ScsiResponse(
        bidi_overflow=bool(b1 & 0x10),
        bidi_underflow=bool(b1 & 0x08),
        overflow=bool(b1 & 0x04),
        underflow=bool(b1 & 0x02),
        response=response,
        status=status,
        itt=itt,
        snack_tag=snack,
        statsn=statsn,
        expcmdsn=expcmdsn,
        maxcmdsn=maxcmdsn,
        exp_data_sn=expdatasn,
        bidi_residual_count=bidi,
        residual_count=resid,
        sense=sense,
        response_data=response_data,
    )


def _decode_tmf_response(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    _no_ahs_or_data(h, ahs, data, "Task Management Function Response")
    _, _, response, _, _, _, itt, _, statsn, expcmdsn, maxcmdsn, _, _, _ = _BHS.unpack_from(h)
    return TaskManagementResponse(
        response=response, itt=itt, statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn
    )


def _decode_login_response(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    _no_ahs(h, ahs, "Login Response")
    (_, b1, vmax, vactive, _, isid_tsih, itt, _, statsn, expcmdsn, maxcmdsn, status, _,
     _) = _BHS.unpack_from(h)  # fmt: skip
    csg, nsg = _login_stages(h, b1)
    return LoginResponse(
        transit=bool(b1 & 0x80),
        cont=bool(b1 & 0x40),
        csg=csg,
        nsg=nsg,
        version_max=vmax,
        version_active=vactive,
        isid=isid_tsih >> 16,
        tsih=isid_tsih & 0xFFFF,
        itt=itt,
        statsn=statsn,
        expcmdsn=expcmdsn,
        maxcmdsn=maxcmdsn,
        status_class=status >> 24,
        status_detail=(status >> 16) & 0xFF,
        data=data,
    )


def _decode_text_response(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    _no_ahs(h, ahs, "Text Response")
    _, b1, _, _, _, lun, itt, ttt, statsn, expcmdsn, maxcmdsn, _, _, _ = _BHS.unpack_from(h)
    return TextResponse(
        final=bool(b1 & 0x80),
        cont=bool(b1 & 0x40),
        lun=lun,
        itt=itt,
        ttt=ttt,
        statsn=statsn,
        expcmdsn=expcmdsn,
        maxcmdsn=maxcmdsn,
        data=data,
    )


def _decode_data_in(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    _no_ahs(h, ahs, "SCSI Data-In")
    (_, b1, _, status, _, lun, itt, ttt, statsn, expcmdsn, maxcmdsn, datasn, offset,
     resid) = _BHS.unpack_from(h)  # fmt: skip
    return DataIn(
        final=bool(b1 & 0x80),
        ack=bool(b1 & 0x40),
        overflow=bool(b1 & 0x04),
        underflow=bool(b1 & 0x02),
        status_present=bool(b1 & 0x01),
        status=status,
        lun=lun,
        itt=itt,
        ttt=ttt,
        statsn=statsn,
        expcmdsn=expcmdsn,
        maxcmdsn=maxcmdsn,
        data_sn=datasn,
        buffer_offset=offset,
        residual_count=resid,
        data=data,
    )


def _decode_logout_response(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    _no_ahs_or_data(h, ahs, data, "Logout Response")
    _, _, response, _, _, _, itt, _, statsn, expcmdsn, maxcmdsn, _, times, _ = _BHS.unpack_from(h)
    return LogoutResponse(
        response=response,
        itt=itt,
        statsn=statsn,
        expcmdsn=expcmdsn,
        maxcmdsn=maxcmdsn,
        time2wait=times >> 16,
        time2retain=times & 0xFFFF,
    )


def _decode_r2t(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    _no_ahs_or_data(h, ahs, data, "R2T")
    (_, _, _, _, _, lun, itt, ttt, statsn, expcmdsn, maxcmdsn, r2tsn, offset,
     ddtl) = _BHS.unpack_from(h)  # fmt: skip
    return R2T(
        lun=lun,
        itt=itt,
        ttt=ttt,
        statsn=statsn,
        expcmdsn=expcmdsn,
        maxcmdsn=maxcmdsn,
        r2t_sn=r2tsn,
        buffer_offset=offset,
        desired_data_transfer_length=ddtl,
    )


def _decode_async_message(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    _no_ahs(h, ahs, "Asynchronous Message")
    _, _, _, _, _, lun, _, _, statsn, expcmdsn, maxcmdsn, w36, w40, _ = _BHS.unpack_from(h)
    sense, event_data = _split_sense(h, data, "Asynchronous Message")
    return AsyncMessage(
        lun=lun,
        statsn=statsn,
        expcmdsn=expcmdsn,
        maxcmdsn=maxcmdsn,
        async_event=w36 >> 24,
        async_vcode=(w36 >> 16) & 0xFF,
        parameter1=w36 & 0xFFFF,
        parameter2=w40 >> 16,
        parameter3=w40 & 0xFFFF,
        sense=sense,
        event_data=event_data,
    )


def _decode_reject(h: Buffer, ahs: Buffer, data: memoryview) -> Pdu:
    _no_ahs(h, ahs, "Reject")
    _, _, reason, _, _, _, _, _, statsn, expcmdsn, maxcmdsn, datasn, _, _ = _BHS.unpack_from(h)
    return Reject(
        reason=reason,
        statsn=statsn,
        expcmdsn=expcmdsn,
        maxcmdsn=maxcmdsn,
        data_sn=datasn,
        header=data,
    )


_Decoder = Callable[[Buffer, Buffer, memoryview], Pdu]
_DECODERS: dict[int, _Decoder] = {  # int keys: cheaper lookups than IntEnum keys
    Opcode.NOP_OUT: _decode_nop_out,
    Opcode.SCSI_COMMAND: _decode_scsi_command,
    Opcode.TASK_MANAGEMENT_REQUEST: _decode_tmf_request,
    Opcode.LOGIN_REQUEST: _decode_login_request,
    Opcode.TEXT_REQUEST: _decode_text_request,
    Opcode.SCSI_DATA_OUT: _decode_data_out,
    Opcode.LOGOUT_REQUEST: _decode_logout_request,
    Opcode.SNACK_REQUEST: _decode_snack_request,
    Opcode.NOP_IN: _decode_nop_in,
    Opcode.SCSI_RESPONSE: _decode_scsi_response,
    Opcode.TASK_MANAGEMENT_RESPONSE: _decode_tmf_response,
    Opcode.LOGIN_RESPONSE: _decode_login_response,
    Opcode.TEXT_RESPONSE: _decode_text_response,
    Opcode.SCSI_DATA_IN: _decode_data_in,
    Opcode.LOGOUT_RESPONSE: _decode_logout_response,
    Opcode.R2T: _decode_r2t,
    Opcode.ASYNC_MESSAGE: _decode_async_message,
    Opcode.REJECT: _decode_reject,
}
_DECODERS = {int(op): fn for op, fn in _DECODERS.items()}


def decode_pdu(header: Buffer, ahs: Buffer = b"", data: Buffer = _EMPTY) -> Pdu:
    """Decode one PDU from its BHS, its AHS bytes and its data segment (no padding/digests).

    Raises RemoteProtocolError (with the Reject reason and the header) for an unknown or
    vendor-specific opcode (COMMAND_NOT_SUPPORTED), lengths that disagree with the header,
    reserved code values in defined fields and segments a PDU type cannot carry.
    """
    if len(header) != BHS_LENGTH:
        raise RemoteProtocolError(
            f"basic header segment is {len(header)} bytes, not 48",
            header=bytes(header[:BHS_LENGTH]) or None,
        )
    decoder = _DECODERS.get(header[0] & 0x3F)
    if decoder is None:
        raise _bad(
            header,
            f"unsupported opcode 0x{header[0] & 0x3F:02x}",
            RejectReason.COMMAND_NOT_SUPPORTED,
        )
    if _U32.unpack_from(header, 4)[0] != (len(ahs) << 22 | len(data)) or len(ahs) & 3:
        raise _bad(
            header,
            "AHS or data length disagrees with TotalAHSLength/DataSegmentLength",
            RejectReason.PROTOCOL_ERROR,
        )
    if not isinstance(data, memoryview):
        data = memoryview(data)
    return decoder(header, ahs, data)


# --- stream reader ----------------------------------------------------------------------------

_INITIATOR = frozenset(op for op in _DECODERS if op < 0x20)
_TARGET = frozenset(op for op in _DECODERS if op >= 0x20)


class PduReader:
    """Splits a byte stream into PDUs, like h2's frame buffer.

    `feed()` bytes as they arrive; `next_pdu()` (or iteration) returns complete PDUs, or None
    while one is incomplete. It waits for the 48-byte BHS, then for the AHS, header digest,
    padded data segment and data digest. Lengths are checked against the caps before anything
    beyond the header is buffered.

    Errors: `FramingError` / `HeaderDigestError` leave the reader broken (every later call
    raises again: drop the connection). `DataDigestError` and other `RemoteProtocolError`s
    consumed exactly the offending PDU; the next call goes on with the following one.

    `header_digest`, `data_digest` and `max_recv_data_segment_length` may change between PDUs
    (negotiation enables digests after login). `sender` says whose PDUs this stream carries:
    a target's reader refuses target opcodes and vice versa.

    Data segments are memoryviews into the fed bytes objects when a PDU arrived within one
    `feed()`; a PDU split across feeds is joined once, when it is complete.
    """

    def __init__(
        self,
        *,
        max_recv_data_segment_length: int = 8192,
        header_digest: bool = False,
        data_digest: bool = False,
        max_ahs_length: int = 272,
        sender: Literal["initiator", "target", "any"] = "initiator",
    ) -> None:
        self._chunks: deque[memoryview] = deque()
        self._avail = 0
        self._frame: tuple[int, int, int] | None = None  # (ahs length, data length, total)
        self._broken: FramingError | None = None
        self._header_digest = header_digest
        self._data_digest = data_digest
        self._max_data = max_recv_data_segment_length
        self.max_ahs_length = min(max_ahs_length, MAX_AHS_LENGTH)
        self._accept = {"initiator": _INITIATOR, "target": _TARGET}.get(sender)

    # Settings apply from the next PDU not yet framed.
    @property
    def header_digest(self) -> bool:
        return self._header_digest

    @header_digest.setter
    def header_digest(self, value: bool) -> None:
        self._header_digest = value
        self._frame = None

    @property
    def data_digest(self) -> bool:
        return self._data_digest

    @data_digest.setter
    def data_digest(self, value: bool) -> None:
        self._data_digest = value
        self._frame = None

    @property
    def max_recv_data_segment_length(self) -> int:
        return self._max_data

    @max_recv_data_segment_length.setter
    def max_recv_data_segment_length(self, value: int) -> None:
        self._max_data = value
        self._frame = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as PDUs (non-zero at EOF: truncated PDU)."""
        return self._avail

    def feed(self, data: Buffer) -> None:
        if not data:
            return
        if not isinstance(data, bytes):
            data = bytes(data)  # the caller may reuse a bytearray/memoryview buffer
        self._chunks.append(memoryview(data))
        self._avail += len(data)

    def __iter__(self) -> Iterator[Pdu]:
        while (pdu := self.next_pdu()) is not None:
            yield pdu

    def _front(self, n: int) -> memoryview:
        """The first chunk, made at least `n` bytes long (copies only the bytes it joins)."""
        chunks = self._chunks
        first = chunks[0]
        if len(first) >= n:
            return first
        parts = []
        got = 0
        while got < n:
            c = chunks.popleft()
            if got + len(c) <= n:
                parts.append(c)
                got += len(c)
            else:
                parts.append(c[: n - got])
                chunks.appendleft(c[n - got :])
                got = n
        joined = memoryview(b"".join(parts))
        chunks.appendleft(joined)
        return joined

    def _consume(self, n: int) -> None:
        first = self._chunks[0]
        if len(first) == n:
            self._chunks.popleft()
        else:
            self._chunks[0] = first[n:]
        self._avail -= n

    def _fail(self, exc: FramingError) -> FramingError:
        self._broken = exc
        return exc

    def next_pdu(self) -> Pdu | None:
        if self._broken is not None:
            raise self._broken
        if self._avail < BHS_LENGTH:
            return None
        frame = self._frame
        if frame is None:
            head = self._front(BHS_LENGTH)
            ahs_len = head[4] * 4
            data_len = head[5] << 16 | head[6] << 8 | head[7]
            if ahs_len > self.max_ahs_length:
                raise self._fail(
                    FramingError(
                        f"AHS of {ahs_len} bytes exceeds the {self.max_ahs_length}-byte cap",
                        reason=RejectReason.PROTOCOL_ERROR,
                        header=bytes(head[:BHS_LENGTH]),
                    )
                )
            hd = 4 if self._header_digest else 0
            if hd:
                # the lengths are only trustworthy once the header digest checks out
                if self._avail < BHS_LENGTH + ahs_len + hd:
                    return None
                head = self._front(BHS_LENGTH + ahs_len + hd)
                covered = head[: BHS_LENGTH + ahs_len]
                got = int.from_bytes(
                    head[BHS_LENGTH + ahs_len : BHS_LENGTH + ahs_len + 4], "little"
                )
                if crc32c(covered) != got:
                    raise self._fail(
                        HeaderDigestError("header digest mismatch", header=bytes(head[:BHS_LENGTH]))
                    )
            if data_len > self._max_data:
                raise self._fail(
                    FramingError(
                        f"data segment of {data_len} bytes exceeds "
                        f"MaxRecvDataSegmentLength {self._max_data}",
                        reason=RejectReason.PROTOCOL_ERROR,
                        header=bytes(head[:BHS_LENGTH]),
                    )
                )
            total = BHS_LENGTH + ahs_len + hd + data_len + (-data_len % 4)
            if data_len and self._data_digest:
                total += 4
            frame = self._frame = (ahs_len, data_len, total)
        ahs_len, data_len, total = frame
        if self._avail < total:
            return None
        buf = self._front(total)
        self._consume(total)
        self._frame = None
        header = buf[:BHS_LENGTH]
        ahs = buf[BHS_LENGTH : BHS_LENGTH + ahs_len]
        start = BHS_LENGTH + ahs_len + (4 if self._header_digest else 0)
        data = buf[start : start + data_len]
        if data_len and self._data_digest:
            padded_end = start + data_len + (-data_len % 4)
            got = int.from_bytes(buf[padded_end : padded_end + 4], "little")
            if crc32c(buf[start:padded_end]) != got:
                raise DataDigestError("data digest mismatch", header=bytes(header))
        if self._accept is not None and header[0] & 0x3F not in self._accept:
            opcode = header[0] & 0x3F
            if opcode in _DECODERS:
                raise _bad(
                    header,
                    f"opcode 0x{opcode:02x} from the wrong side",
                    RejectReason.PROTOCOL_ERROR,
                )
        return decode_pdu(header, ahs, data)
