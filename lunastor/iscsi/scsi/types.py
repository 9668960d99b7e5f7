"""What the iSCSI session layer hands to the SCSI layer, and what it gets back.

The session layer (iSCSI) collects a command's data-out, calls `ScsiTarget.execute`, and turns
the `ScsiResult` into Data-In / SCSI Response PDUs (computing residuals from
`ScsiResult.transfer_length` against the initiator's expected data transfer length).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Status(IntEnum):
    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class TaskAttribute(IntEnum):
    """iSCSI SCSI Command ATTR field values."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


class TmfFunction(IntEnum):
    """Task Management Function Request function codes (RFC 7143 11.5.1)."""

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

    COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


@dataclass(frozen=True, slots=True)
class Nexus:
    """An I_T nexus: who is talking to us, through which port.

    `initiator_port` is the SCSI initiator port name ("<iqn>,i,0x<isid hex>"), the identity
    persistent reservations register; `relative_port` is this access point's relative target
    port identifier (distinct per chunk server).
    """

    initiator_name: str
    isid: int
    target_name: str
    relative_port: int = 1
    tpgt: int = 1

    @property
    def initiator_port(self) -> str:
        return f"{self.initiator_name},i,0x{self.isid:012x}"

    @property
    def target_port(self) -> str:
        return f"{self.target_name},t,0x{self.tpgt:04x}"


@dataclass(slots=True)
class ScsiCommand:
    nexus: Nexus
    lun: int  # the flat LUN number (0..16383), already decoded from the 8-byte LUN field
    cdb: bytes
    task_tag: int
    attribute: TaskAttribute = TaskAttribute.SIMPLE
    expected_length: int = 0  # the initiator's Expected Data Transfer Length
    data_out: bytes | bytearray | memoryview = b""  # all write data, collected by the session


@dataclass(slots=True)
class ScsiResult:
    status: Status = Status.GOOD
    data_in: bytes | bytearray | memoryview = b""  # already cut to the CDB's allocation length
    sense: bytes = b""  # fixed-format sense data (SPC-4 4.5.3) when status is CHECK CONDITION
    # Bytes the CDB itself asks to move (in its direction), e.g. blocks * block_size for a READ
    # or the allocation length for INQUIRY; None when the command moves no data. The session
    # compares it with expected_length to set the residual overflow/underflow flags.
    transfer_length: int | None = None
