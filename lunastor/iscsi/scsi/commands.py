"""The command table: one `CommandSpec` per (operation code, service action).

Handler modules register their commands with `@command(...)`; the target dispatches through
`lookup(cdb)`. Each spec carries its CDB usage mask (the bits a CDB may set, as REPORT
SUPPORTED OPERATION CODES reports them), which also drives the generic reserved-bit check:
any bit outside the mask answers INVALID FIELD IN CDB with a field pointer to that bit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from lunastor.iscsi.scsi.sense import INVALID_COMMAND_OPERATION_CODE, CheckCondition, invalid_cdb

if TYPE_CHECKING:
    from lunastor.iscsi.scsi.target import LogicalUnit, NexusState, ScsiTarget
    from lunastor.iscsi.scsi.types import ScsiCommand, ScsiResult

Handler = Callable[
    ["ScsiTarget", "LogicalUnit | None", "ScsiCommand", "NexusState | None"],
    Awaitable["ScsiResult"],
]


class Access(Enum):
    """How a command fares under reservations (SPC-4 5.12.5 tables, SPC-2 7.21)."""

    ALLOWED = 0  # never conflicts (INQUIRY, REPORT LUNS, PR IN ...)
    READ = 1  # conflicts for nexuses without access under exclusive-access types
    WRITE = 2  # conflicts for every nexus without write access
    PR_OUT = 3  # decided by the PR logic itself (conflicts with another's SPC-2 reservation)
    SPC2 = 4  # RESERVE/RELEASE: decided by the SPC-2 logic itself
    SPC2_ONLY = 5  # allowed under persistent reservations, conflicts with SPC-2 ones (TUR)


@dataclass(slots=True)
class CommandSpec:
    opcode: int
    service_action: int | None
    name: str
    usage: bytes  # CDB usage data: byte 0 the opcode, then the bits each byte may set
    handler: Handler
    access: Access = Access.READ
    # False for INQUIRY, REPORT LUNS, REQUEST SENSE: they neither report nor clear a pending UA
    unit_attention: bool = True
    # True when the command is answered even at a LUN that does not exist for the nexus
    without_lu: bool = False
    nominal_timeout: int = 0  # seconds, for the command timeouts descriptor (0: unspecified)
    recommended_timeout: int = 0
    reserved_mask: int = field(init=False)  # CDB bits that must be zero, as one big integer
    # the same mask placed for a 16-byte CDB (what iSCSI carries), to test without slicing
    reserved_mask16: int = field(init=False)
    cdb_length: int = field(init=False)

    def __post_init__(self) -> None:
        self.cdb_length = len(self.usage)
        allowed = bytearray(self.usage)
        allowed[0] = 0xFF
        if self.service_action is not None:
            allowed[1] |= 0x1F
        full = (1 << (8 * len(allowed))) - 1
        self.reserved_mask = full ^ int.from_bytes(allowed, "big")
        self.reserved_mask16 = (
            self.reserved_mask << 8 * (16 - len(allowed)) if len(allowed) <= 16 else 0
        )

    def check_reserved(self, cdb: bytes | bytearray | memoryview) -> None:
        """INVALID FIELD IN CDB, pointing at the first bit set outside the usage mask."""
        if len(cdb) == 16 and not int.from_bytes(cdb, "big") & self.reserved_mask16:
            return
        n = len(self.usage)
        head = bytes(cdb[:n]) if len(cdb) >= n else bytes(cdb) + bytes(n - len(cdb))
        bad = int.from_bytes(head, "big") & self.reserved_mask
        if not bad:
            return
        for i in range(1, n):
            b = head[i] & ~self.usage[i] & 0xFF
            if i == 1 and self.service_action is not None:
                b &= 0xE0
            if b:
                raise invalid_cdb(i, b.bit_length() - 1)


# opcode -> spec for commands without service actions (the dispatch table the hot path reads)
# opcode -> spec for commands without service actions: the table the hot path reads
BY_OPCODE: dict[int, CommandSpec] = {}
_BY_SA: dict[int, dict[int, CommandSpec]] = {}


def command(
    opcode: int,
    name: str,
    usage: bytes | list[int],
    *,
    service_action: int | None = None,
    access: Access = Access.READ,
    unit_attention: bool = True,
    without_lu: bool = False,
    timeout: tuple[int, int] = (0, 0),
) -> Callable[[Any], Any]:
    """Register the decorated handler for an opcode (and service action)."""

    def register(handler: Handler) -> Handler:
        spec = CommandSpec(
            opcode,
            service_action,
            name,
            bytes(usage),
            handler,
            access,
            unit_attention,
            without_lu,
            timeout[0],
            timeout[1],
        )
        if spec.usage[0] != opcode:
            raise ValueError(f"{name}: usage byte 0 must be the opcode")
        if service_action is None:
            if opcode in BY_OPCODE or opcode in _BY_SA:
                raise ValueError(f"{name}: opcode {opcode:#04x} registered twice")
            BY_OPCODE[opcode] = spec
        else:
            if opcode in BY_OPCODE:
                raise ValueError(f"{name}: opcode {opcode:#04x} registered without SA")
            table = _BY_SA.setdefault(opcode, {})
            if service_action in table:
                raise ValueError(f"{name}: service action registered twice")
            table[service_action] = spec
        return handler

    return register


def lookup(cdb: bytes | bytearray | memoryview) -> CommandSpec:
    """The spec for a CDB, or CheckCondition for an unknown opcode / service action."""
    if not cdb:
        raise CheckCondition(INVALID_COMMAND_OPERATION_CODE)
    spec = BY_OPCODE.get(cdb[0])
    if spec is not None:
        return spec
    table = _BY_SA.get(cdb[0])
    if table is None:
        raise CheckCondition(INVALID_COMMAND_OPERATION_CODE)
    spec = table.get(cdb[1] & 0x1F if len(cdb) > 1 else 0)
    if spec is None:
        raise invalid_cdb(1, 4)
    return spec


def all_specs() -> list[CommandSpec]:
    specs = list(BY_OPCODE.values())
    for table in _BY_SA.values():
        specs.extend(table.values())
    specs.sort(key=lambda s: (s.opcode, s.service_action or 0))
    return specs


def find(opcode: int, service_action: int | None) -> CommandSpec | None:
    if service_action is None:
        return BY_OPCODE.get(opcode)
    return _BY_SA.get(opcode, {}).get(service_action)


def has_service_actions(opcode: int) -> bool:
    return opcode in _BY_SA


def data_result(data: bytes | bytearray, allocation_length: int) -> ScsiResult:
    """GOOD with parameter data cut to the CDB's allocation length."""
    from lunastor.iscsi.scsi.types import ScsiResult, Status

    if len(data) > allocation_length:
        data = data[:allocation_length]
    return ScsiResult(Status.GOOD, data, b"", allocation_length)
