"""Sense data (SPC-4 4.5): the (sense key, ASC, ASCQ) table and the two sense formats.

Every failure the SCSI layer reports is a `CheckCondition` carrying one `SenseCode` from the
table below, optionally a sense-key-specific field pointer (which CDB or parameter-list byte
and bit was wrong) and an INFORMATION value. `BlockDeviceError`s map one-to-one onto codes
through `device_error_code`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from lunastor.iscsi.blockdev import (
    BlockDeviceError,
    MediumError,
    Miscompare,
    NexusLost,
    NotReady,
    OutOfRange,
    SpaceExhausted,
    WriteProtected,
)


class SenseKey(IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


@dataclass(frozen=True, slots=True)
class SenseCode:
    key: SenseKey
    asc: int
    ascq: int
    name: str


def _c(key: SenseKey, asc: int, ascq: int, name: str) -> SenseCode:
    return SenseCode(key, asc, ascq, name)


_K = SenseKey
NO_ADDITIONAL_SENSE = _c(_K.NO_SENSE, 0x00, 0x00, "NO ADDITIONAL SENSE INFORMATION")
# NOT READY
LU_NOT_READY_CAUSE_NOT_REPORTABLE = _c(_K.NOT_READY, 0x04, 0x00, "LU NOT READY")
LU_NOT_READY_INIT_REQUIRED = _c(
    _K.NOT_READY, 0x04, 0x02, "LU NOT READY, INITIALIZING COMMAND REQUIRED"
)
LU_NOT_ACCESSIBLE_TRANSITION = _c(
    _K.NOT_READY, 0x04, 0x0A, "LU NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION"
)
MEDIUM_NOT_PRESENT = _c(_K.NOT_READY, 0x3A, 0x00, "MEDIUM NOT PRESENT")
# MEDIUM ERROR
WRITE_ERROR = _c(_K.MEDIUM_ERROR, 0x0C, 0x00, "WRITE ERROR")
UNRECOVERED_READ_ERROR = _c(_K.MEDIUM_ERROR, 0x11, 0x00, "UNRECOVERED READ ERROR")
# HARDWARE ERROR
INTERNAL_TARGET_FAILURE = _c(_K.HARDWARE_ERROR, 0x44, 0x00, "INTERNAL TARGET FAILURE")
# ILLEGAL REQUEST
PARAMETER_LIST_LENGTH_ERROR = _c(_K.ILLEGAL_REQUEST, 0x1A, 0x00, "PARAMETER LIST LENGTH ERROR")
INVALID_COMMAND_OPERATION_CODE = _c(
    _K.ILLEGAL_REQUEST, 0x20, 0x00, "INVALID COMMAND OPERATION CODE"
)
LBA_OUT_OF_RANGE = _c(_K.ILLEGAL_REQUEST, 0x21, 0x00, "LOGICAL BLOCK ADDRESS OUT OF RANGE")
INVALID_FIELD_IN_CDB = _c(_K.ILLEGAL_REQUEST, 0x24, 0x00, "INVALID FIELD IN CDB")
LU_NOT_SUPPORTED = _c(_K.ILLEGAL_REQUEST, 0x25, 0x00, "LOGICAL UNIT NOT SUPPORTED")
INVALID_FIELD_IN_PARAMETER_LIST = _c(
    _K.ILLEGAL_REQUEST, 0x26, 0x00, "INVALID FIELD IN PARAMETER LIST"
)
INVALID_RELEASE_OF_PR = _c(
    _K.ILLEGAL_REQUEST, 0x26, 0x04, "INVALID RELEASE OF PERSISTENT RESERVATION"
)
SAVING_PARAMETERS_NOT_SUPPORTED = _c(
    _K.ILLEGAL_REQUEST, 0x39, 0x00, "SAVING PARAMETERS NOT SUPPORTED"
)
MEDIUM_REMOVAL_PREVENTED = _c(_K.ILLEGAL_REQUEST, 0x53, 0x02, "MEDIUM REMOVAL PREVENTED")
INSUFFICIENT_REGISTRATION_RESOURCES = _c(
    _K.ILLEGAL_REQUEST, 0x55, 0x04, "INSUFFICIENT REGISTRATION RESOURCES"
)
# UNIT ATTENTION
POWER_ON_RESET = _c(_K.UNIT_ATTENTION, 0x29, 0x00, "POWER ON, RESET, OR BUS DEVICE RESET OCCURRED")
BUS_DEVICE_RESET = _c(_K.UNIT_ATTENTION, 0x29, 0x03, "BUS DEVICE RESET FUNCTION OCCURRED")
MODE_PARAMETERS_CHANGED = _c(_K.UNIT_ATTENTION, 0x2A, 0x01, "MODE PARAMETERS CHANGED")
RESERVATIONS_PREEMPTED = _c(_K.UNIT_ATTENTION, 0x2A, 0x03, "RESERVATIONS PREEMPTED")
RESERVATIONS_RELEASED = _c(_K.UNIT_ATTENTION, 0x2A, 0x04, "RESERVATIONS RELEASED")
REGISTRATIONS_PREEMPTED = _c(_K.UNIT_ATTENTION, 0x2A, 0x05, "REGISTRATIONS PREEMPTED")
CAPACITY_DATA_HAS_CHANGED = _c(_K.UNIT_ATTENTION, 0x2A, 0x09, "CAPACITY DATA HAS CHANGED")
COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = _c(
    _K.UNIT_ATTENTION, 0x2F, 0x00, "COMMANDS CLEARED BY ANOTHER INITIATOR"
)
REPORTED_LUNS_DATA_HAS_CHANGED = _c(_K.UNIT_ATTENTION, 0x3F, 0x0E, "REPORTED LUNS DATA HAS CHANGED")
# DATA PROTECT
WRITE_PROTECTED = _c(_K.DATA_PROTECT, 0x27, 0x00, "WRITE PROTECTED")
SPACE_ALLOCATION_FAILED_WRITE_PROTECT = _c(
    _K.DATA_PROTECT, 0x27, 0x07, "SPACE ALLOCATION FAILED WRITE PROTECT"
)
# ABORTED COMMAND
I_T_NEXUS_LOSS_ABORTED = _c(_K.ABORTED_COMMAND, 0x29, 0x07, "I_T NEXUS LOSS OCCURRED")
# MISCOMPARE
MISCOMPARE_DURING_VERIFY = _c(_K.MISCOMPARE, 0x1D, 0x00, "MISCOMPARE DURING VERIFY OPERATION")


UNIT_ATTENTIONS = {
    (c.asc, c.ascq): c
    for c in (
        POWER_ON_RESET,
        BUS_DEVICE_RESET,
        MODE_PARAMETERS_CHANGED,
        RESERVATIONS_PREEMPTED,
        RESERVATIONS_RELEASED,
        REGISTRATIONS_PREEMPTED,
        CAPACITY_DATA_HAS_CHANGED,
        COMMANDS_CLEARED_BY_ANOTHER_INITIATOR,
        REPORTED_LUNS_DATA_HAS_CHANGED,
    )
}


@dataclass(frozen=True, slots=True)
class FieldPointer:
    """Sense-key-specific data for ILLEGAL REQUEST (SPC-4 4.5.2.4.2)."""

    in_cdb: bool  # C/D bit: the error is in the CDB (else in the parameter list)
    byte: int
    bit: int | None = None  # bit pointer (0..7) when it names one bit of the field


class CheckCondition(Exception):
    """A command ends with CHECK CONDITION and this sense. Raised by handlers, caught once."""

    def __init__(
        self,
        code: SenseCode,
        field: FieldPointer | None = None,
        information: int | None = None,
    ) -> None:
        super().__init__(code.name)
        self.code = code
        self.field = field
        self.information = information


def invalid_cdb(byte: int, bit: int | None = None) -> CheckCondition:
    return CheckCondition(INVALID_FIELD_IN_CDB, FieldPointer(True, byte, bit))


def invalid_param(byte: int, bit: int | None = None) -> CheckCondition:
    return CheckCondition(INVALID_FIELD_IN_PARAMETER_LIST, FieldPointer(False, byte, bit))


def _sks(field: FieldPointer | None) -> bytes:
    if field is None:
        return b"\x00\x00\x00"
    b0 = 0x80 | (0x40 if field.in_cdb else 0)
    if field.bit is not None:
        b0 |= 0x08 | (field.bit & 7)
    return bytes((b0, (field.byte >> 8) & 0xFF, field.byte & 0xFF))


def fixed_sense(
    code: SenseCode, field: FieldPointer | None = None, information: int | None = None
) -> bytes:
    """Fixed-format sense data, 18 bytes, response code 70h (current error)."""
    buf = bytearray(18)
    buf[0] = 0x70
    buf[2] = code.key
    if information is not None:
        buf[0] |= 0x80  # VALID: INFORMATION holds a meaningful value
        buf[3:7] = (information & 0xFFFFFFFF).to_bytes(4, "big")
    buf[7] = 10
    buf[12] = code.asc
    buf[13] = code.ascq
    buf[15:18] = _sks(field)
    return bytes(buf)


def descriptor_sense(
    code: SenseCode, field: FieldPointer | None = None, information: int | None = None
) -> bytes:
    """Descriptor-format sense data, response code 72h, with information and SKS descriptors."""
    descs = bytearray()
    if information is not None:
        descs += b"\x00\x0a\x80\x00" + (information & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")
    if field is not None:
        descs += b"\x02\x06\x00\x00" + _sks(field) + b"\x00"
    return bytes((0x72, code.key, code.asc, code.ascq, 0, 0, 0, len(descs))) + bytes(descs)


def build_sense(
    code: SenseCode,
    field: FieldPointer | None = None,
    information: int | None = None,
    *,
    descriptor: bool = False,
) -> bytes:
    if descriptor:
        return descriptor_sense(code, field, information)
    return fixed_sense(code, field, information)


@dataclass(frozen=True, slots=True)
class ParsedSense:
    """Sense data decoded from either format (for tests and for logging)."""

    key: int
    asc: int
    ascq: int
    information: int | None
    field: FieldPointer | None
    descriptor: bool


def parse_sense(data: bytes) -> ParsedSense:
    """Decode sense data; raises ValueError if it is not well formed."""
    if len(data) < 8:
        raise ValueError("sense data shorter than 8 bytes")
    rc = data[0] & 0x7F
    if rc in (0x70, 0x71):
        if len(data) < 18 or data[7] + 8 != len(data):
            raise ValueError("fixed sense: bad additional sense length")
        info = int.from_bytes(data[3:7], "big") if data[0] & 0x80 else None
        return ParsedSense(data[2] & 0xF, data[12], data[13], info, _parse_sks(data[15:18]), False)
    if rc in (0x72, 0x73):
        if data[7] + 8 != len(data):
            raise ValueError("descriptor sense: bad additional sense length")
        dinfo: int | None = None
        field = None
        pos = 8
        while pos < len(data):
            if pos + 2 > len(data) or pos + 2 + data[pos + 1] > len(data):
                raise ValueError("descriptor sense: truncated descriptor")
            dtype, dlen = data[pos], data[pos + 1]
            if dtype == 0 and dlen == 10:
                dinfo = int.from_bytes(data[pos + 4 : pos + 12], "big")
            elif dtype == 2 and dlen == 6:
                field = _parse_sks(data[pos + 4 : pos + 7])
            pos += 2 + dlen
        return ParsedSense(data[1] & 0xF, data[2], data[3], dinfo, field, True)
    raise ValueError(f"unknown sense response code {rc:#x}")


def _parse_sks(sks: bytes) -> FieldPointer | None:
    if not sks[0] & 0x80:
        return None
    bit = sks[0] & 7 if sks[0] & 0x08 else None
    return FieldPointer(bool(sks[0] & 0x40), (sks[1] << 8) | sks[2], bit)


def device_error_check(error: BlockDeviceError) -> CheckCondition:
    """The one-to-one mapping from a block device error onto sense (docs/scsi.md)."""
    if isinstance(error, OutOfRange):
        return CheckCondition(LBA_OUT_OF_RANGE)
    if isinstance(error, MediumError):
        code = WRITE_ERROR if error.write else UNRECOVERED_READ_ERROR
        return CheckCondition(code, information=error.lba)
    if isinstance(error, SpaceExhausted):
        return CheckCondition(SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
    if isinstance(error, NotReady):
        return CheckCondition(LU_NOT_ACCESSIBLE_TRANSITION)
    if isinstance(error, WriteProtected):
        return CheckCondition(WRITE_PROTECTED)
    if isinstance(error, Miscompare):
        return CheckCondition(MISCOMPARE_DURING_VERIFY, information=error.offset)
    if isinstance(error, NexusLost):
        return CheckCondition(I_T_NEXUS_LOSS_ABORTED)
    return CheckCondition(INTERNAL_TARGET_FAILURE)
