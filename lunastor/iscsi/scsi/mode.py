"""MODE SENSE(6)/(10) and MODE SELECT(6)/(10) (SPC-4 7.5, SBC-3 6.4).

Pages: read-write error recovery (01h), caching (08h: WCE changeable), control (0Ah: D_SENSE
and SWP changeable), informational exceptions control (1Ch). Saved parameters are not
supported (page control 11b -> SAVING PARAMETERS NOT SUPPORTED).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from lunastor.iscsi.scsi.commands import Access, command, data_result
from lunastor.iscsi.scsi.pr import PrState
from lunastor.iscsi.scsi.reservations import ReservationsBusy, update
from lunastor.iscsi.scsi.sense import (
    INTERNAL_TARGET_FAILURE,
    MODE_PARAMETERS_CHANGED,
    PARAMETER_LIST_LENGTH_ERROR,
    SAVING_PARAMETERS_NOT_SUPPORTED,
    CheckCondition,
    invalid_cdb,
    invalid_param,
)
from lunastor.iscsi.scsi.types import ScsiResult

if TYPE_CHECKING:
    from lunastor.iscsi.scsi.target import LogicalUnit, NexusState, ScsiTarget
    from lunastor.iscsi.scsi.types import ScsiCommand

CURRENT, CHANGEABLE, DEFAULT, SAVED = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class ModePage:
    code: int
    length: int  # PAGE LENGTH (bytes after the 2-byte header)
    render: Callable[[LogicalUnit, int], bytes]  # (lu, page control) -> whole page
    apply: Callable[[ModeValues, bytes], bool] | None = None  # returns True if changed


@dataclass
class ModeValues:
    """The changeable mode parameters (a scratch copy MODE SELECT changes, then stores)."""

    write_cache: bool
    descriptor_sense: bool
    software_write_protect: bool

    def as_tuple(self) -> tuple[bool, bool, bool]:
        return (self.write_cache, self.descriptor_sense, self.software_write_protect)


def _page(code: int, body: bytearray) -> bytes:
    return bytes((code, len(body))) + bytes(body)


def _error_recovery(lu: LogicalUnit, pc: int) -> bytes:
    body = bytearray(10)
    if pc != CHANGEABLE:
        body[0] = 0x80  # AWRE
    return _page(0x01, body)


def _caching(lu: LogicalUnit, pc: int) -> bytes:
    body = bytearray(18)
    if pc == CHANGEABLE:
        body[0] = 0x04  # WCE
    elif pc == DEFAULT or lu.write_cache:
        body[0] = 0x04
    return _page(0x08, body)


def _apply_caching(lu: ModeValues, page: bytes) -> bool:
    wce = bool(page[2] & 0x04)
    changed = wce != lu.write_cache
    lu.write_cache = wce
    return changed


def _control(lu: LogicalUnit, pc: int) -> bytes:
    body = bytearray(10)
    if pc == CHANGEABLE:
        body[0] = 0x04  # D_SENSE
        body[2] = 0x08  # SWP
        return _page(0x0A, body)
    body[0] = 0x20  # TST 001b: a task set per I_T nexus
    body[1] = 0x10  # queue algorithm modifier 1: unrestricted reordering
    if pc == CURRENT:
        body[0] |= 0x04 if lu.descriptor_sense else 0
        body[2] |= 0x08 if lu.software_write_protect else 0
    body[6:8] = b"\xff\xff"  # busy timeout period: unlimited
    return _page(0x0A, body)


def _apply_control(lu: ModeValues, page: bytes) -> bool:
    d_sense = bool(page[2] & 0x04)
    swp = bool(page[4] & 0x08)
    changed = (d_sense, swp) != (lu.descriptor_sense, lu.software_write_protect)
    lu.descriptor_sense = d_sense
    lu.software_write_protect = swp
    return changed


def _informational_exceptions(lu: LogicalUnit, pc: int) -> bytes:
    body = bytearray(10)
    if pc != CHANGEABLE:
        body[0] = 0x08  # DEXCPT: no informational exception reporting
    return _page(0x1C, body)


PAGES: dict[int, ModePage] = {
    0x01: ModePage(0x01, 10, _error_recovery),
    0x08: ModePage(0x08, 18, _caching, _apply_caching),
    0x0A: ModePage(0x0A, 10, _control, _apply_control),
    0x1C: ModePage(0x1C, 10, _informational_exceptions),
}


def _pages(lu: LogicalUnit, code: int, subpage: int, pc: int, pc_byte: int) -> bytes:
    if code == 0x3F:
        if subpage not in (0x00, 0xFF):
            raise invalid_cdb(3)
        return b"".join(p.render(lu, pc) for p in PAGES.values())
    page = PAGES.get(code)
    if page is None:
        raise invalid_cdb(pc_byte, 5)
    if subpage:
        raise invalid_cdb(3)
    return page.render(lu, pc)


def _block_descriptor(lu: LogicalUnit, long: bool) -> bytes:
    dev = lu.device
    if long:
        return dev.num_blocks.to_bytes(8, "big") + bytes(4) + dev.block_size.to_bytes(4, "big")
    blocks = min(dev.num_blocks, 0xFFFFFFFF)
    return blocks.to_bytes(4, "big") + b"\x00" + dev.block_size.to_bytes(3, "big")


def _device_specific(lu: LogicalUnit) -> int:
    return (0x80 if lu.write_protected else 0) | 0x10  # WP, DPOFUA


@command(0x1A, "MODE SENSE(6)", [0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0x00], access=Access.READ)
async def mode_sense6(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None
    cdb = cmd.cdb
    dbd = bool(cdb[1] & 0x08)
    pc, code, subpage, alloc = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3], cdb[4]
    if pc == SAVED:
        raise CheckCondition(SAVING_PARAMETERS_NOT_SUPPORTED)
    pages = _pages(lu, code, subpage, pc, 2)
    bd = b"" if dbd else _block_descriptor(lu, False)
    body = bytes((0, _device_specific(lu), len(bd))) + bd + pages
    return data_result(bytes((min(len(body), 255),)) + body, alloc)


@command(
    0x5A, "MODE SENSE(10)", [0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0x00], access=Access.READ
)
async def mode_sense10(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None
    cdb = cmd.cdb
    llbaa, dbd = bool(cdb[1] & 0x10), bool(cdb[1] & 0x08)
    pc, code, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    alloc = int.from_bytes(cdb[7:9], "big")
    if pc == SAVED:
        raise CheckCondition(SAVING_PARAMETERS_NOT_SUPPORTED)
    pages = _pages(lu, code, subpage, pc, 2)
    bd = b"" if dbd else _block_descriptor(lu, llbaa)
    header = bytes((0, _device_specific(lu), 0x01 if llbaa and bd else 0, 0))
    body = header + len(bd).to_bytes(2, "big") + bd + pages
    return data_result(len(body).to_bytes(2, "big") + body, alloc)


async def _select(
    target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand, header_len: int, length: int, sp: bool
) -> None:
    if sp:
        raise invalid_cdb(1, 0)  # saving parameters is not supported
    if length == 0:
        return
    data = bytes(cmd.data_out[:length])
    if len(data) < header_len:
        raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
    bd_len = data[3] if header_len == 4 else int.from_bytes(data[6:8], "big")
    pos = header_len
    if bd_len:
        long = header_len == 8 and bool(data[4] & 0x01)
        size = 16 if long else 8
        if bd_len != size or len(data) < pos + size:
            raise invalid_param(header_len - 1)
        bd = data[pos : pos + size]
        block_len = int.from_bytes(bd[-3:] if not long else bd[12:16], "big")
        if block_len not in (0, lu.device.block_size):
            raise invalid_param(pos + size - 3)
        pos += size
    changes: list[tuple[ModePage, bytes]] = []
    while pos < len(data):
        if len(data) < pos + 2:
            raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
        if data[pos] & 0x40:
            raise invalid_param(pos, 6)  # SPF: no subpages
        code = data[pos] & 0x3F
        page = PAGES.get(code)
        if page is None:
            raise invalid_param(pos, 5)
        if data[pos + 1] != page.length:
            raise invalid_param(pos + 1)
        if len(data) < pos + 2 + page.length:
            raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
        new = data[pos : pos + 2 + page.length]
        current = page.render(lu, CURRENT)
        mask = page.render(lu, CHANGEABLE)
        for i in range(2, len(new)):
            diff = (new[i] ^ current[i]) & ~mask[i] & 0xFF
            if diff:
                raise invalid_param(pos + i, diff.bit_length() - 1)
        changes.append((page, new))
        pos += 2 + page.length
    if not any(page.apply is not None for page, _ in changes):
        return
    # Through the reservation store, so that every access point applies the new values and
    # raises MODE PARAMETERS CHANGED for its nexuses (all but ours), this one included. The
    # pages apply to the stored values, so that changes of different pages through different
    # access points at once are all kept.
    notice = ((cmd.nexus.initiator_port, cmd.nexus.target_port), *_MODE_CHANGED)

    def change(state: PrState) -> PrState:
        before = state.mode if state.mode is not None else DEFAULT_MODE
        values = ModeValues(*before)
        for page, new in changes:
            if page.apply is not None:
                page.apply(values, new)
        if values.as_tuple() == before:
            return state
        return replace(state, mode=values.as_tuple(), notices=(notice,))

    try:
        await update(target.reservations, lu.pr_key, change)
    except ReservationsBusy:
        raise CheckCondition(INTERNAL_TARGET_FAILURE) from None


_MODE_CHANGED = (MODE_PARAMETERS_CHANGED.asc, MODE_PARAMETERS_CHANGED.ascq)
# (WCE, D_SENSE, SWP) of a LU nobody changed: `LogicalUnit`'s initial values
DEFAULT_MODE = (True, False, False)


@command(0x15, "MODE SELECT(6)", [0x15, 0x11, 0, 0, 0xFF, 0x00], access=Access.WRITE)
async def mode_select6(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None
    length = cmd.cdb[4]
    await _select(target, lu, cmd, 4, length, bool(cmd.cdb[1] & 0x01))
    return ScsiResult(transfer_length=length)


@command(
    0x55, "MODE SELECT(10)", [0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x00], access=Access.WRITE
)
async def mode_select10(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None
    length = int.from_bytes(cmd.cdb[7:9], "big")
    await _select(target, lu, cmd, 8, length, bool(cmd.cdb[1] & 0x01))
    return ScsiResult(transfer_length=length)
