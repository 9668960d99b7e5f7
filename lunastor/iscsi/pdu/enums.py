"""The code values of iSCSI PDU fields (RFC 7143 section 11): one set of enums.

The task attribute and task management enums are the SCSI layer's (`scsi/types.py`),
re-exported here so that codec users and the SCSI layer name their members alike.
"""

from __future__ import annotations

from enum import IntEnum

from lunastor.iscsi.scsi.types import TaskAttribute as TaskAttribute
from lunastor.iscsi.scsi.types import TmfFunction as TmfFunction
from lunastor.iscsi.scsi.types import TmfResponse as TmfResponse

BHS_LENGTH = 48
RESERVED_TAG = 0xFFFFFFFF  # "no task tag" / "no transfer tag"
MAX_DATA_SEGMENT_LENGTH = 0xFFFFFF  # 24-bit DataSegmentLength
MAX_AHS_LENGTH = 255 * 4  # 8-bit TotalAHSLength in 4-byte words


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
    """Additional Header Segment types (RFC 7143 11.2.2)."""

    EXTENDED_CDB = 1
    BIDIRECTIONAL_READ_LENGTH = 2
