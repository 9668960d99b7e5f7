"""The PDUs: one slotted dataclass per type, each field declared once with its place on the wire.

Each field says where it sits in the 48-byte Basic Header Segment, as the figures of RFC 7143
section 11 draw it: `number(offset, struct format, RFC name)` (with a bit mask when several
share a byte or word), `flag(offset, mask, RFC name)` (one bit, read as a bool), or that it is
the data segment (`SEGMENT`, or `SENSE` then `SEGMENT` for SenseLength-prefixed sense data and
what follows it). A class's `FIXED` bits are set when encoding and ignored when
decoding; bytes 4-7 (TotalAHSLength, DataSegmentLength) are the codec's. `codec.py` generates
each type's encoder and decoder from these declarations.

Fields hold raw wire values: the LUN as the 64-bit field (see `lun_number` / `lun_field`),
codes as ints (unknown task management functions must still be answered).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, ClassVar

from lunastor.iscsi.errors import LocalProtocolError, RejectReason
from lunastor.iscsi.pdu.enums import (
    RESERVED_TAG,
    AsyncEvent,
    LogoutReason,
    LogoutResponseCode,
    Opcode,
    SnackType,
    Stage,
    TaskAttribute,
    TmfFunction,
    TmfResponse,
)

Buffer = bytes | bytearray | memoryview


# --- the schema -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Field:
    """An unsigned number at byte `offset`, packed as struct `fmt` ("B", "H", "I", "Q"; "16s"
    for the CDB). With `mask`, only those bits of the unit (it is shared with other fields or
    flags). Decoding refuses values above `most` (reserved codes)."""

    offset: int
    fmt: str
    rfc: str  # the RFC's name, for messages
    mask: int = 0
    most: int | None = None


@dataclass(frozen=True, slots=True)
class Flag:
    """A one-bit flag, read as a bool: bit `mask` of byte `offset`."""

    offset: int
    mask: int
    rfc: str


@dataclass(frozen=True, slots=True)
class Fixed:
    """Bits that are always `value` on the wire (e.g. a F bit the RFC sets to 1)."""

    offset: int
    fmt: str
    value: int


@dataclass(frozen=True, slots=True)
class Segment:
    """The data segment, or with `sense_length` a SenseLength-prefixed sense buffer (the next
    field holds what follows the sense data)."""

    sense_length: bool = False


@dataclass(frozen=True, slots=True)
class BidiAhs:
    """The Bidirectional Read Expected Data Transfer Length AHS (11.3.1.1), or None."""


Part = Field | Flag | Fixed
Wire = Field | Flag | Segment | BidiAhs
WIRE = "wire"  # the metadata key of a dataclass field's wire description


def _declare(wire: Wire, default: object) -> Any:
    return field(default=default, metadata={WIRE: wire})


def number(
    offset: int, fmt: str, rfc: str, default: int = 0, *, mask: int = 0, most: int | None = None
) -> Any:
    """Declare a field: `name: int = number(offset, fmt, rfc)`."""
    return _declare(Field(offset, fmt, rfc, mask, most), default)


def flag(offset: int, mask: int, rfc: str, default: bool = False) -> Any:
    return _declare(Flag(offset, mask, rfc), default)


# declare the data segment fields with `field(default=b"", metadata=SEGMENT)`
SEGMENT = {WIRE: Segment()}  # the data segment, or what follows the sense data in it
SENSE = {WIRE: Segment(sense_length=True)}


def wire_of(cls: type[Pdu]) -> list[tuple[str, Wire]]:
    """A PDU type's fields in declaration order with their wire descriptions."""
    out = []
    for f in fields(cls):  # type: ignore[arg-type]
        if WIRE not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with its place on the wire")
        out.append((f.name, f.metadata[WIRE]))
    return out


# the fields most PDUs share, at the same place in each
IMMEDIATE = partial(flag, 0, 0x40, "I")
FINAL = partial(flag, 1, 0x80, "F")
CONT = partial(flag, 1, 0x40, "C")
F_SET = Fixed(1, "B", 0x80)  # the F bit of single-PDU types, always 1
NO_ITT = Fixed(16, "I", RESERVED_TAG)
LUN = partial(number, 8, "Q", "LUN")
ITT = partial(number, 16, "I", "Initiator Task Tag")
TTT = partial(number, 20, "I", "Target Transfer Tag")
CMDSN = partial(number, 24, "I", "CmdSN")
EXPSTATSN = partial(number, 28, "I", "ExpStatSN")
STATSN = partial(number, 24, "I", "StatSN")
EXPCMDSN = partial(number, 28, "I", "ExpCmdSN")
MAXCMDSN = partial(number, 32, "I", "MaxCmdSN")
DATASN = partial(number, 36, "I", "DataSN")
BUFFER_OFFSET = partial(number, 40, "I", "Buffer Offset")
RESIDUAL = partial(number, 44, "I", "Residual Count")
RESPONSE = partial(number, 2, "B", "Response")
STATUS = partial(number, 3, "B", "Status")
TRANSIT = partial(flag, 1, 0x80, "T")
CSG = partial(number, 1, "B", "CSG", Stage.SECURITY_NEGOTIATION, mask=0x0C)
NSG = partial(number, 1, "B", "NSG", Stage.SECURITY_NEGOTIATION, mask=0x03)
ISID = partial(number, 8, "Q", "ISID", mask=0xFFFF_FFFF_FFFF_0000)
TSIH = partial(number, 8, "Q", "TSIH", mask=0xFFFF)
CID = partial(number, 20, "H", "CID")
VERSION_MAX = partial(number, 2, "B", "Version-max")


class Pdu:
    """Base of every PDU dataclass. Each field is declared with its place on the wire; `FIXED`
    lists the bits that are constant (set when encoding, ignored when decoding)."""

    __slots__ = ()
    opcode: ClassVar[Opcode]
    NAME: ClassVar[str]  # as the RFC names it, for messages
    FIXED: ClassVar[tuple[Fixed, ...]] = ()

    def encode_bhs(self) -> tuple[bytes, Buffer]:
        """The header (+AHS) and the data segment; generated for each type by codec.py."""
        raise NotImplementedError(type(self).__name__)


# --- initiator PDUs ---------------------------------------------------------------------------


@dataclass(slots=True)
class NopOut(Pdu):
    opcode = Opcode.NOP_OUT
    NAME = "NOP-Out"
    FIXED = (F_SET,)
    immediate: bool = IMMEDIATE()
    lun: int = LUN()
    itt: int = ITT(RESERVED_TAG)
    ttt: int = TTT(RESERVED_TAG)
    cmdsn: int = CMDSN()
    expstatsn: int = EXPSTATSN()
    data: Buffer = field(default=b"", metadata=SEGMENT)


@dataclass(slots=True)
class ScsiCommand(Pdu):
    """SCSI Command (11.3). `cdb` is the full CDB: the 16-byte field plus any extended CDB AHS."""

    opcode = Opcode.SCSI_COMMAND
    NAME = "SCSI Command"
    immediate: bool = IMMEDIATE()
    final: bool = FINAL(True)
    read: bool = flag(1, 0x40, "R")
    write: bool = flag(1, 0x20, "W")
    attr: int = number(1, "B", "ATTR", TaskAttribute.SIMPLE, mask=0x07, most=TaskAttribute.ACA)
    lun: int = LUN()
    itt: int = ITT()
    expected_data_transfer_length: int = number(20, "I", "Expected Data Transfer Length")
    cmdsn: int = CMDSN()
    expstatsn: int = EXPSTATSN()
    cdb: bytes = _declare(Field(32, "16s", "CDB"), bytes(16))  # beyond 16 bytes: in the AHS
    bidi_expected_read_length: int | None = _declare(BidiAhs(), None)
    data: Buffer = field(default=b"", metadata=SEGMENT)


@dataclass(slots=True)
class TaskManagementRequest(Pdu):
    opcode = Opcode.TASK_MANAGEMENT_REQUEST
    NAME = "Task Management Function Request"
    FIXED = (F_SET,)
    immediate: bool = IMMEDIATE(True)
    # the raw 7-bit code: unknown functions are answered (REJECTED), not refused
    function: int = number(1, "B", "Function", TmfFunction.ABORT_TASK, mask=0x7F)
    lun: int = LUN()
    itt: int = ITT()
    referenced_task_tag: int = number(20, "I", "Referenced Task Tag", RESERVED_TAG)
    cmdsn: int = CMDSN()
    expstatsn: int = EXPSTATSN()
    ref_cmdsn: int = number(32, "I", "RefCmdSN")
    exp_data_sn: int = number(36, "I", "ExpDataSN")


@dataclass(slots=True)
class LoginRequest(Pdu):
    """Login Request (11.12); the I bit is always set on the wire."""

    opcode = Opcode.LOGIN_REQUEST
    NAME = "Login Request"
    FIXED = (Fixed(0, "B", 0x40),)
    transit: bool = TRANSIT()
    cont: bool = CONT()
    csg: int = CSG()
    nsg: int = NSG()
    version_max: int = VERSION_MAX()
    version_min: int = number(3, "B", "Version-min")
    isid: int = ISID()
    tsih: int = TSIH()
    itt: int = ITT()
    cid: int = CID()
    cmdsn: int = CMDSN()
    expstatsn: int = EXPSTATSN()
    data: Buffer = field(default=b"", metadata=SEGMENT)


@dataclass(slots=True)
class TextRequest(Pdu):
    opcode = Opcode.TEXT_REQUEST
    NAME = "Text Request"
    immediate: bool = IMMEDIATE()
    final: bool = FINAL(True)
    cont: bool = CONT()
    lun: int = LUN()
    itt: int = ITT()
    ttt: int = TTT(RESERVED_TAG)
    cmdsn: int = CMDSN()
    expstatsn: int = EXPSTATSN()
    data: Buffer = field(default=b"", metadata=SEGMENT)


@dataclass(slots=True)
class DataOut(Pdu):
    opcode = Opcode.SCSI_DATA_OUT
    NAME = "SCSI Data-Out"
    final: bool = FINAL()
    lun: int = LUN()
    itt: int = ITT()
    ttt: int = TTT(RESERVED_TAG)
    expstatsn: int = EXPSTATSN()
    data_sn: int = DATASN()
    buffer_offset: int = BUFFER_OFFSET()
    data: Buffer = field(default=b"", metadata=SEGMENT)


@dataclass(slots=True)
class LogoutRequest(Pdu):
    opcode = Opcode.LOGOUT_REQUEST
    NAME = "Logout Request"
    FIXED = (F_SET,)
    immediate: bool = IMMEDIATE()
    reason: int = number(
        1, "B", "Reason Code", mask=0x7F, most=LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY
    )
    itt: int = ITT()
    cid: int = CID()
    cmdsn: int = CMDSN()
    expstatsn: int = EXPSTATSN()


@dataclass(slots=True)
class SnackRequest(Pdu):
    opcode = Opcode.SNACK_REQUEST
    NAME = "SNACK Request"
    FIXED = (F_SET,)
    snack_type: int = number(1, "B", "Type", mask=0x0F, most=SnackType.R_DATA)
    lun: int = LUN()
    itt: int = ITT(RESERVED_TAG)
    ttt: int = TTT(RESERVED_TAG)  # or SNACK Tag for R-Data SNACK
    expstatsn: int = EXPSTATSN()
    begrun: int = number(40, "I", "BegRun")
    run_length: int = number(44, "I", "RunLength")


# --- target PDUs ------------------------------------------------------------------------------


@dataclass(slots=True)
class NopIn(Pdu):
    opcode = Opcode.NOP_IN
    NAME = "NOP-In"
    FIXED = (F_SET,)
    lun: int = LUN()
    itt: int = ITT(RESERVED_TAG)
    ttt: int = TTT(RESERVED_TAG)
    statsn: int = STATSN()
    expcmdsn: int = EXPCMDSN()
    maxcmdsn: int = MAXCMDSN()
    data: Buffer = field(default=b"", metadata=SEGMENT)


@dataclass(slots=True)
class ScsiResponse(Pdu):
    """SCSI Response (11.4). The data segment is SenseLength + `sense` + `response_data`."""

    opcode = Opcode.SCSI_RESPONSE
    NAME = "SCSI Response"
    FIXED = (F_SET,)
    bidi_overflow: bool = flag(1, 0x10, "o")
    bidi_underflow: bool = flag(1, 0x08, "u")
    overflow: bool = flag(1, 0x04, "O")
    underflow: bool = flag(1, 0x02, "U")
    response: int = RESPONSE()  # 0 = command completed at target
    status: int = STATUS()  # SCSI status
    itt: int = ITT()
    snack_tag: int = number(20, "I", "SNACK Tag")
    statsn: int = STATSN()
    expcmdsn: int = EXPCMDSN()
    maxcmdsn: int = MAXCMDSN()
    exp_data_sn: int = number(36, "I", "ExpDataSN")
    bidi_residual_count: int = number(40, "I", "Bidirectional Read Residual Count")
    residual_count: int = RESIDUAL()
    sense: Buffer = field(default=b"", metadata=SENSE)
    response_data: Buffer = field(default=b"", metadata=SEGMENT)


@dataclass(slots=True)
class TaskManagementResponse(Pdu):
    opcode = Opcode.TASK_MANAGEMENT_RESPONSE
    NAME = "Task Management Function Response"
    FIXED = (F_SET,)
    response: int = RESPONSE(TmfResponse.COMPLETE)
    itt: int = ITT()
    statsn: int = STATSN()
    expcmdsn: int = EXPCMDSN()
    maxcmdsn: int = MAXCMDSN()


@dataclass(slots=True)
class LoginResponse(Pdu):
    opcode = Opcode.LOGIN_RESPONSE
    NAME = "Login Response"
    transit: bool = TRANSIT()
    cont: bool = CONT()
    csg: int = CSG()
    nsg: int = NSG()
    version_max: int = VERSION_MAX()
    version_active: int = number(3, "B", "Version-active")
    isid: int = ISID()
    tsih: int = TSIH()
    itt: int = ITT()
    statsn: int = STATSN()
    expcmdsn: int = EXPCMDSN()
    maxcmdsn: int = MAXCMDSN()
    status_class: int = number(36, "B", "Status-Class")
    status_detail: int = number(37, "B", "Status-Detail")
    data: Buffer = field(default=b"", metadata=SEGMENT)


@dataclass(slots=True)
class TextResponse(Pdu):
    opcode = Opcode.TEXT_RESPONSE
    NAME = "Text Response"
    final: bool = FINAL(True)
    cont: bool = CONT()
    lun: int = LUN()
    itt: int = ITT()
    ttt: int = TTT(RESERVED_TAG)
    statsn: int = STATSN()
    expcmdsn: int = EXPCMDSN()
    maxcmdsn: int = MAXCMDSN()
    data: Buffer = field(default=b"", metadata=SEGMENT)


@dataclass(slots=True)
class DataIn(Pdu):
    """SCSI Data-In (11.7). `status_present` is the S bit; `status`/`statsn` are valid with it."""

    opcode = Opcode.SCSI_DATA_IN
    NAME = "SCSI Data-In"
    final: bool = FINAL()
    ack: bool = flag(1, 0x40, "A")
    overflow: bool = flag(1, 0x04, "O")
    underflow: bool = flag(1, 0x02, "U")
    status_present: bool = flag(1, 0x01, "S")
    status: int = STATUS()
    lun: int = LUN()
    itt: int = ITT()
    ttt: int = TTT(RESERVED_TAG)
    statsn: int = STATSN()
    expcmdsn: int = EXPCMDSN()
    maxcmdsn: int = MAXCMDSN()
    data_sn: int = DATASN()
    buffer_offset: int = BUFFER_OFFSET()
    residual_count: int = RESIDUAL()
    data: Buffer = field(default=b"", metadata=SEGMENT)


@dataclass(slots=True)
class LogoutResponse(Pdu):
    opcode = Opcode.LOGOUT_RESPONSE
    NAME = "Logout Response"
    FIXED = (F_SET,)
    response: int = RESPONSE(LogoutResponseCode.CLOSED_SUCCESSFULLY)
    itt: int = ITT()
    statsn: int = STATSN()
    expcmdsn: int = EXPCMDSN()
    maxcmdsn: int = MAXCMDSN()
    time2wait: int = number(40, "H", "Time2Wait")
    time2retain: int = number(42, "H", "Time2Retain")


@dataclass(slots=True)
class R2T(Pdu):
    opcode = Opcode.R2T
    NAME = "R2T"
    FIXED = (F_SET,)
    lun: int = LUN()
    itt: int = ITT()
    ttt: int = TTT()
    statsn: int = STATSN()
    expcmdsn: int = EXPCMDSN()
    maxcmdsn: int = MAXCMDSN()
    r2t_sn: int = number(36, "I", "R2TSN")
    buffer_offset: int = BUFFER_OFFSET()
    desired_data_transfer_length: int = number(44, "I", "Desired Data Transfer Length")


@dataclass(slots=True)
class AsyncMessage(Pdu):
    """Asynchronous Message (11.9); data segment is SenseLength + `sense` + `event_data`."""

    opcode = Opcode.ASYNC_MESSAGE
    NAME = "Asynchronous Message"
    FIXED = (F_SET, NO_ITT)
    lun: int = LUN()
    statsn: int = STATSN()
    expcmdsn: int = EXPCMDSN()
    maxcmdsn: int = MAXCMDSN()
    async_event: int = number(36, "B", "AsyncEvent", AsyncEvent.SCSI_ASYNC_EVENT)
    async_vcode: int = number(37, "B", "AsyncVCode")
    parameter1: int = number(38, "H", "Parameter1")
    parameter2: int = number(40, "H", "Parameter2")
    parameter3: int = number(42, "H", "Parameter3")
    sense: Buffer = field(default=b"", metadata=SENSE)
    event_data: Buffer = field(default=b"", metadata=SEGMENT)


@dataclass(slots=True)
class Reject(Pdu):
    """Reject (11.17); the data segment is the complete header of the rejected PDU."""

    opcode = Opcode.REJECT
    NAME = "Reject"
    FIXED = (F_SET, NO_ITT)
    reason: int = number(2, "B", "Reason", RejectReason.PROTOCOL_ERROR)
    statsn: int = STATSN()
    expcmdsn: int = EXPCMDSN()
    maxcmdsn: int = MAXCMDSN()
    data_sn: int = number(36, "I", "DataSN/R2TSN")  # for SNACK rejects
    header: Buffer = field(default=b"", metadata=SEGMENT)


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


# --- LUN field (SAM-5 4.7: single-level peripheral and flat space addressing) -----------------


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
