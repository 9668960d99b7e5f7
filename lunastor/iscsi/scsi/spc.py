"""SPC-4 primary commands: INQUIRY and VPD pages, REPORT LUNS, TEST UNIT READY, REQUEST SENSE,
REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS, REPORT TARGET PORT GROUPS,
PREVENT ALLOW MEDIUM REMOVAL and START STOP UNIT."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lunastor.iscsi.scsi import commands
from lunastor.iscsi.scsi.commands import Access, command, data_result
from lunastor.iscsi.scsi.pr import ReservationConflict, conflicts
from lunastor.iscsi.scsi.sense import (
    LU_NOT_SUPPORTED,
    MEDIUM_NOT_PRESENT,
    MEDIUM_REMOVAL_PREVENTED,
    NO_ADDITIONAL_SENSE,
    CheckCondition,
    SenseCode,
    build_sense,
    invalid_cdb,
)
from lunastor.iscsi.scsi.types import ScsiResult

if TYPE_CHECKING:
    from lunastor.iscsi.scsi.target import LogicalUnit, NexusState, ScsiTarget
    from lunastor.iscsi.scsi.types import Nexus, ScsiCommand

PROTOCOL_ISCSI = 0x5
TARGET_PORT_GROUP = 1
# SAM-5, iSCSI (RFC 7143), SPC-4, SBC-3
VERSION_DESCRIPTORS = (0x00A0, 0x0960, 0x0460, 0x04C0)
SUPPORTED_VPD = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)


def not_ready(lu: LogicalUnit) -> SenseCode | None:
    # `lu.started` is False exactly while a removable medium is ejected (the hot path tests
    # that one attribute); a virtual volume is otherwise always ready.
    if not lu.medium_present or not lu.started:
        return MEDIUM_NOT_PRESENT
    return None


def check_ready(lu: LogicalUnit) -> None:
    code = not_ready(lu)
    if code is not None:
        raise CheckCondition(code)


def _ascii(text: str, width: int) -> bytes:
    return text.encode("ascii", "replace")[:width].ljust(width, b" ")


# -- INQUIRY ------------------------------------------------------------------------------


def standard_inquiry(lu: LogicalUnit | None) -> bytes:
    data = bytearray(96)
    if lu is None:
        data[0] = 0x7F  # peripheral qualifier 011b, device type 1Fh: no LU here
        vendor, product, revision = "LUNASTOR", "VOLUME", "0001"
    else:
        data[0] = 0x00  # connected direct-access block device
        data[1] = 0x80 if lu.removable else 0
        vendor, product, revision = lu.vendor, lu.product, lu.revision
    data[2] = 0x06  # SPC-4
    data[3] = 0x10 | 0x02  # HiSup, response data format 2 (NormACA not supported)
    data[4] = len(data) - 5
    data[5] = 0x10  # TPGS 01b: implicit ALUA
    data[6] = 0x10  # MultiP: the LU is reachable through several target ports
    data[7] = 0x02  # CmdQue
    data[8:16] = _ascii(vendor, 8)
    data[16:32] = _ascii(product, 16)
    data[32:36] = _ascii(revision, 4)
    for i, v in enumerate(VERSION_DESCRIPTORS):
        data[58 + 2 * i : 60 + 2 * i] = v.to_bytes(2, "big")
    return bytes(data)


def _designator(code_set: int, assoc: int, dtype: int, body: bytes, piv: bool = False) -> bytes:
    b0 = (PROTOCOL_ISCSI << 4 | code_set) if piv else code_set
    b1 = (0x80 if piv else 0) | (assoc << 4) | dtype
    return bytes((b0, b1, 0, len(body))) + body


def _name_string(name: str) -> bytes:
    raw = name.encode("utf-8") + b"\x00"
    return raw.ljust((len(raw) + 3) // 4 * 4, b"\x00")


def _vpd_page(code: int, body: bytes) -> bytes:
    return bytes((0, code)) + len(body).to_bytes(2, "big") + body


def vpd(target: ScsiTarget, lu: LogicalUnit, nexus: Nexus, page: int) -> bytes:
    if page == 0x00:
        return _vpd_page(0x00, bytes(SUPPORTED_VPD))
    if page == 0x80:
        return _vpd_page(0x80, lu.serial.encode("ascii"))
    if page == 0x83:
        naa_len = 16 if lu.naa_id >> 64 else 8
        body = b"".join(
            (
                _designator(1, 0, 3, lu.naa_id.to_bytes(naa_len, "big")),
                _designator(2, 0, 1, _ascii(lu.vendor, 8) + lu.serial.encode("ascii")),
                _designator(1, 1, 4, target.relative_port.to_bytes(4, "big"), piv=True),
                _designator(1, 1, 5, TARGET_PORT_GROUP.to_bytes(4, "big"), piv=True),
                _designator(3, 1, 8, _name_string(nexus.target_port), piv=True),
                _designator(3, 2, 8, _name_string(target.name), piv=True),
            )
        )
        return _vpd_page(0x83, body)
    if page == 0xB0:
        limits = bytearray(0x3C)
        limits[0] = 0x01  # WSNZ: WRITE SAME with zero blocks is refused
        limits[1] = min(lu.max_compare_write_blocks, 255)
        granularity = max(1, lu.device.physical_block_size // lu.device.block_size)
        limits[2:4] = granularity.to_bytes(2, "big")
        limits[4:8] = lu.max_transfer_blocks.to_bytes(4, "big")
        limits[8:12] = lu.optimal_transfer_blocks.to_bytes(4, "big")
        if lu.device.thin:
            limits[16:20] = lu.max_unmap_blocks.to_bytes(4, "big")
            limits[20:24] = lu.max_unmap_descriptors.to_bytes(4, "big")
            limits[24:28] = granularity.to_bytes(4, "big")
            limits[28:32] = (0x80000000).to_bytes(4, "big")  # UGAVALID, alignment 0
        limits[32:40] = lu.max_write_same_blocks.to_bytes(8, "big")
        return _vpd_page(0xB0, bytes(limits))
    if page == 0xB1:
        chars = bytearray(0x3C)
        chars[0:2] = (1).to_bytes(2, "big")  # medium rotation rate 1: non-rotating
        return _vpd_page(0xB1, bytes(chars))
    if page == 0xB2:
        prov = bytearray(4)
        if lu.device.thin:
            prov[1] = 0x80 | 0x40 | 0x20 | 0x04  # LBPU, LBPWS, LBPWS10, LBPRZ
            prov[2] = 0x02  # provisioning type: thin
        return _vpd_page(0xB2, bytes(prov))
    raise invalid_cdb(2)


@command(
    0x12,
    "INQUIRY",
    [0x12, 0x01, 0xFF, 0xFF, 0xFF, 0x00],
    access=Access.ALLOWED,
    unit_attention=False,
    without_lu=True,
)
async def inquiry(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    cdb = cmd.cdb
    evpd = cdb[1] & 1
    page = cdb[2]
    alloc = int.from_bytes(cdb[3:5], "big")
    if not evpd:
        if page:
            raise invalid_cdb(2)
        return data_result(standard_inquiry(lu), alloc)
    if lu is None:
        raise CheckCondition(LU_NOT_SUPPORTED)
    return data_result(vpd(target, lu, cmd.nexus, page), alloc)


# -- REPORT LUNS ------------------------------------------------------------------------


def encode_lun(lun: int) -> bytes:
    if lun < 256:
        return bytes((0, lun)) + bytes(6)  # peripheral device addressing
    return bytes((0x40 | (lun >> 8), lun & 0xFF)) + bytes(6)  # flat space addressing


@command(
    0xA0,
    "REPORT LUNS",
    [0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x00],
    access=Access.ALLOWED,
    unit_attention=False,
    without_lu=True,
)
async def report_luns(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    cdb = cmd.cdb
    select = cdb[2]
    alloc = int.from_bytes(cdb[6:10], "big")
    if alloc < 16:
        raise invalid_cdb(6)
    if select in (0x00, 0x02):
        luns = sorted(target.visible(cmd.nexus))
    elif select == 0x01:
        luns = []  # no well-known logical units
    else:
        raise invalid_cdb(2)
    body = b"".join(encode_lun(n) for n in luns)
    return data_result((len(body)).to_bytes(4, "big") + bytes(4) + body, alloc)


# -- TEST UNIT READY / REQUEST SENSE ---------------------------------------------------


@command(0x00, "TEST UNIT READY", [0x00, 0, 0, 0, 0, 0x00], access=Access.SPC2_ONLY)
async def test_unit_ready(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None
    check_ready(lu)
    return ScsiResult()


@command(
    0x03,
    "REQUEST SENSE",
    [0x03, 0x01, 0, 0, 0xFF, 0x00],
    access=Access.ALLOWED,
    unit_attention=False,
    without_lu=True,
)
async def request_sense(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    cdb = cmd.cdb
    descriptor = bool(cdb[1] & 1)
    alloc = cdb[4]
    if lu is None or ns is None:
        code = LU_NOT_SUPPORTED
    elif ns.unit_attentions:
        # SPC-4 5.14: REQUEST SENSE returns a pending unit attention and clears it
        code = ns.unit_attentions.pop(0)
    else:
        code = not_ready(lu) or NO_ADDITIONAL_SENSE
    return data_result(build_sense(code, descriptor=descriptor), alloc)


# -- MAINTENANCE IN: REPORT TARGET PORT GROUPS / OPCODES / TMFS -----------------------


@command(
    0xA3,
    "REPORT TARGET PORT GROUPS",
    [0xA3, 0xE0 | 0x0A, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x00],
    service_action=0x0A,
    access=Access.ALLOWED,
)
async def report_target_port_groups(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    cdb = cmd.cdb
    fmt = cdb[1] >> 5
    alloc = int.from_bytes(cdb[6:10], "big")
    if fmt not in (0, 1):
        raise invalid_cdb(1, 7)
    ports = target.port_list()
    desc = bytearray(8)
    desc[0] = 0x80 | 0x00  # PREF, active/optimized
    desc[1] = 0x01  # AO_SUP: active/optimized is the only state we use
    desc[2:4] = TARGET_PORT_GROUP.to_bytes(2, "big")
    desc[7] = len(ports)
    for p in ports:
        desc += bytes(2) + p.to_bytes(2, "big")
    if fmt == 1:
        header = (len(desc) + 4).to_bytes(4, "big") + bytes((0x10, 0, 0, 0))
    else:
        header = len(desc).to_bytes(4, "big")
    return data_result(header + bytes(desc), alloc)


def _timeouts(spec: commands.CommandSpec) -> bytes:
    return (
        b"\x00\x0a\x00\x00"
        + spec.nominal_timeout.to_bytes(4, "big")
        + spec.recommended_timeout.to_bytes(4, "big")
    )


@command(
    0xA3,
    "REPORT SUPPORTED OPERATION CODES",
    [0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x00],
    service_action=0x0C,
    access=Access.ALLOWED,
)
async def report_supported_opcodes(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    cdb = cmd.cdb
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    opcode = cdb[3]
    sa = int.from_bytes(cdb[4:6], "big")
    alloc = int.from_bytes(cdb[6:10], "big")
    if options == 0:
        out = bytearray()
        for each in commands.all_specs():
            servactv = 1 if each.service_action is not None else 0
            out += bytes((each.opcode, 0))
            out += (each.service_action or 0).to_bytes(2, "big")
            out += bytes((0, (0x02 if rctd else 0) | servactv))
            out += each.cdb_length.to_bytes(2, "big")
            if rctd:
                out += _timeouts(each)
        return data_result(len(out).to_bytes(4, "big") + bytes(out), alloc)
    has_sa = commands.has_service_actions(opcode)
    spec: commands.CommandSpec | None
    if options == 1:
        if has_sa:
            raise invalid_cdb(2, 2)
        spec = commands.find(opcode, None)
    elif options == 2:
        if not has_sa and commands.find(opcode, None) is not None:
            raise invalid_cdb(2, 2)
        spec = commands.find(opcode, sa)
    elif options == 3:
        spec = commands.find(opcode, sa if has_sa else None)
    else:
        raise invalid_cdb(2, 2)
    if spec is None:
        return data_result(bytes((0, 0x01, 0, 0)), alloc)
    out = bytearray((0, (0x80 if rctd else 0) | 0x03))
    out += spec.cdb_length.to_bytes(2, "big") + spec.usage
    if rctd:
        out += _timeouts(spec)
    return data_result(bytes(out), alloc)


@command(
    0xA3,
    "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
    [0xA3, 0x0D, 0x80, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x00],
    service_action=0x0D,
    access=Access.ALLOWED,
)
async def report_supported_tmfs(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    cdb = cmd.cdb
    repd = bool(cdb[2] & 0x80)
    alloc = int.from_bytes(cdb[6:10], "big")
    # ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, TARGET RESET
    data = bytearray((0x80 | 0x40 | 0x10 | 0x08 | 0x02, 0, 0, 0))
    if repd:
        data[3] = 0x0C
        data += bytes(12)
    return data_result(bytes(data), alloc)


# -- removable media --------------------------------------------------------------------


@command(0x1E, "PREVENT ALLOW MEDIUM REMOVAL", [0x1E, 0, 0, 0, 0x03, 0x00], access=Access.SPC2_ONLY)
async def prevent_allow(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None and ns is not None
    prevent = cmd.cdb[4] & 0x03
    if prevent & 0x02:  # medium changer bits: no changer here
        raise invalid_cdb(4, 1)
    # SPC-4 5.12.5: allowing removal never conflicts; preventing it does for a nexus without
    # write access under any persistent reservation type
    state = target.reservations.current(lu.pr_key)
    if prevent and state.type is not None and conflicts(state, ns.itid, True):
        raise ReservationConflict()
    if prevent:
        lu.prevent.add(ns.itid)
    else:
        lu.prevent.discard(ns.itid)
    return ScsiResult()


@command(0x1B, "START STOP UNIT", [0x1B, 0x01, 0, 0x0F, 0xF7, 0x00], access=Access.WRITE)
async def start_stop_unit(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None
    b4 = cmd.cdb[4]
    condition = b4 >> 4
    loej, start = bool(b4 & 0x02), bool(b4 & 0x01)
    if condition or not loej:
        # power conditions (any value: libiscsi StartStopUnit.PwrCnd) and stopping mean
        # nothing to a virtual volume: it stays ready
        return ScsiResult()
    if not lu.removable:
        raise invalid_cdb(4, 1)
    if lu.prevent:  # neither eject nor load while any nexus prevents medium removal
        raise CheckCondition(MEDIUM_REMOVAL_PREVENTED)
    lu.medium_present = lu.started = start
    return ScsiResult()
