"""SBC-3 block commands over the logical unit's `BlockDevice`.

READ/WRITE 10 and 16 are the hot path: one struct unpack, two comparisons, the device call,
and the device's buffer handed back as data-in without a copy. Data-out shorter than the CDB
asks for (the initiator's expected length was smaller) writes only the whole blocks received,
as iSCSI residual handling expects; the session reports the overflow.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from lunastor.iscsi.blockdev import LbaState, Miscompare
from lunastor.iscsi.scsi.commands import Access, command, data_result
from lunastor.iscsi.scsi.sense import (
    INVALID_COMMAND_OPERATION_CODE,
    LBA_OUT_OF_RANGE,
    MISCOMPARE_DURING_VERIFY,
    PARAMETER_LIST_LENGTH_ERROR,
    WRITE_PROTECTED,
    CheckCondition,
    invalid_cdb,
    invalid_param,
)
from lunastor.iscsi.scsi.spc import check_ready
from lunastor.iscsi.scsi.types import ScsiResult, Status

if TYPE_CHECKING:
    from lunastor.iscsi.scsi.target import LogicalUnit, NexusState, ScsiTarget
    from lunastor.iscsi.scsi.types import ScsiCommand

_OOR = LBA_OUT_OF_RANGE
_GOOD = Status.GOOD
_CDB10 = struct.Struct(">BBIBHB")  # opcode, flags, lba, group, length, control
_CDB12 = struct.Struct(">BBIIBB")
_CDB16 = struct.Struct(">BBQIBB")
_RW_TIMEOUT = (30, 60)

# usage masks; byte 1: DPO 0x10, FUA 0x08, RARC 0x04, FUA_NV 0x02 (RD/WRPROTECT not supported)
_R6 = [0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0x00]
_RW10 = [0x00, 0x1E, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x00]
_RW12 = [0x00, 0x1E, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0x00]
_RW16 = [0x00, 0x1E] + [0xFF] * 12 + [0x1F, 0x00]


def _usage(template: list[int], opcode: int, byte1: int | None = None) -> list[int]:
    u = list(template)
    u[0] = opcode
    if byte1 is not None:
        u[1] = byte1
    return u


def _range(lu: LogicalUnit, lba: int, blocks: int) -> None:
    if not lu.started:
        check_ready(lu)
    if lba + blocks > lu.device.num_blocks:
        raise CheckCondition(_OOR)


def _writable(lu: LogicalUnit) -> None:
    if lu.device.read_only or lu.software_write_protect:
        raise CheckCondition(WRITE_PROTECTED)


# -- READ CAPACITY ------------------------------------------------------------------------


@command(
    0x25,
    "READ CAPACITY(10)",
    [0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0x00],
    access=Access.ALLOWED,
)
async def read_capacity10(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None
    check_ready(lu)
    cdb = cmd.cdb
    if not cdb[8] & 1 and any(cdb[2:6]):
        raise invalid_cdb(2)  # an LBA without PMI
    last = lu.device.num_blocks - 1
    data = min(last, 0xFFFFFFFF).to_bytes(4, "big") + lu.device.block_size.to_bytes(4, "big")
    return ScsiResult(_GOOD, data, b"", 8)


def capacity16(lu: LogicalUnit) -> bytes:
    dev = lu.device
    data = bytearray(32)
    data[0:8] = (dev.num_blocks - 1).to_bytes(8, "big")
    data[8:12] = dev.block_size.to_bytes(4, "big")
    data[13] = lu.physical_block_exponent & 0x0F  # logical blocks per physical block exponent
    if dev.thin:
        data[14] = 0x80 | 0x40  # LBPME, LBPRZ
    return bytes(data)


@command(
    0x9E,
    "READ CAPACITY(16)",
    [0x9E, 0x10] + [0xFF] * 12 + [0, 0x00],
    service_action=0x10,
    access=Access.ALLOWED,
)
async def read_capacity16(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None
    check_ready(lu)
    cdb = cmd.cdb
    if any(cdb[2:10]):
        raise invalid_cdb(2)  # LOGICAL BLOCK ADDRESS is obsolete and must be zero (no PMI)
    alloc = int.from_bytes(cdb[10:14], "big")
    return data_result(capacity16(lu), alloc)


# -- READ -----------------------------------------------------------------------------------


async def _read(lu: LogicalUnit, lba: int, blocks: int, length_byte: int) -> ScsiResult:
    if not lu.started:
        check_ready(lu)
    dev = lu.device
    if lba + blocks > dev.num_blocks:
        raise CheckCondition(_OOR)
    if blocks > lu.max_transfer_blocks:
        raise invalid_cdb(length_byte)
    if not blocks:
        return ScsiResult(_GOOD, b"", b"", 0)
    data = await dev.read(lba, blocks)
    return ScsiResult(_GOOD, data, b"", blocks * dev.block_size)


@command(0x08, "READ(6)", _R6, access=Access.READ, timeout=_RW_TIMEOUT)
async def read6(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None
    cdb = cmd.cdb
    lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
    return await _read(lu, lba, cdb[4] or 256, 4)  # READ(6): length 0 means 256 blocks


@command(0x28, "READ(10)", _usage(_RW10, 0x28), access=Access.READ, timeout=_RW_TIMEOUT)
async def read10(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    # READ/WRITE(10)/(16) are the hot path: the common case is inlined (one coroutine less per
    # command); anything unusual falls through to the general _read/_write
    _, _, lba, _, blocks, _ = _CDB10.unpack_from(cmd.cdb)
    dev = lu.device  # type: ignore[union-attr]
    if (
        lu.started  # type: ignore[union-attr]
        and lba + blocks <= dev.num_blocks
        and 0 < blocks <= lu.max_transfer_blocks  # type: ignore[union-attr]
    ):
        return ScsiResult(_GOOD, await dev.read(lba, blocks), b"", blocks * dev.block_size)
    return await _read(lu, lba, blocks, 7)  # type: ignore[arg-type]


@command(0xA8, "READ(12)", _usage(_RW12, 0xA8), access=Access.READ, timeout=_RW_TIMEOUT)
async def read12(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    _, _, lba, blocks, _, _ = _CDB12.unpack_from(cmd.cdb)
    return await _read(lu, lba, blocks, 6)  # type: ignore[arg-type]


@command(0x88, "READ(16)", _usage(_RW16, 0x88), access=Access.READ, timeout=_RW_TIMEOUT)
async def read16(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    _, _, lba, blocks, _, _ = _CDB16.unpack_from(cmd.cdb)
    dev = lu.device  # type: ignore[union-attr]
    if (
        lu.started  # type: ignore[union-attr]
        and lba + blocks <= dev.num_blocks
        and 0 < blocks <= lu.max_transfer_blocks  # type: ignore[union-attr]
    ):
        return ScsiResult(_GOOD, await dev.read(lba, blocks), b"", blocks * dev.block_size)
    return await _read(lu, lba, blocks, 10)  # type: ignore[arg-type]


# -- WRITE --------------------------------------------------------------------------------


async def _write(
    lu: LogicalUnit, cmd: ScsiCommand, lba: int, blocks: int, fua: bool, length_byte: int
) -> ScsiResult:
    if not lu.started:
        check_ready(lu)
    dev = lu.device
    if lba + blocks > dev.num_blocks:
        raise CheckCondition(_OOR)
    if blocks > lu.max_transfer_blocks:
        raise invalid_cdb(length_byte)
    if dev.read_only or lu.software_write_protect:
        raise CheckCondition(WRITE_PROTECTED)
    bs = dev.block_size
    want = blocks * bs
    data = cmd.data_out
    if len(data) != want:
        # EDTL smaller than the CDB's transfer length: write only the whole blocks received
        have = min(len(data), want) // bs * bs
        data = memoryview(data)[:have]
    if data:
        await dev.write(lba, data, fua or not lu.write_cache, cmd.nexus)
    return ScsiResult(_GOOD, b"", b"", want)


@command(0x0A, "WRITE(6)", _usage(_R6, 0x0A), access=Access.WRITE, timeout=_RW_TIMEOUT)
async def write6(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None
    cdb = cmd.cdb
    lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
    return await _write(lu, cmd, lba, cdb[4] or 256, False, 4)


@command(0x2A, "WRITE(10)", _usage(_RW10, 0x2A), access=Access.WRITE, timeout=_RW_TIMEOUT)
async def write10(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    _, flags, lba, _, blocks, _ = _CDB10.unpack_from(cmd.cdb)
    dev = lu.device  # type: ignore[union-attr]
    data = cmd.data_out
    want = blocks * dev.block_size
    if (
        lu.started  # type: ignore[union-attr]
        and lba + blocks <= dev.num_blocks
        and 0 < blocks <= lu.max_transfer_blocks  # type: ignore[union-attr]
        and len(data) == want
        and not dev.read_only
        and not lu.software_write_protect  # type: ignore[union-attr]
    ):
        await dev.write(lba, data, bool(flags & 0x08) or not lu.write_cache, cmd.nexus)  # type: ignore[union-attr]
        return ScsiResult(_GOOD, b"", b"", want)
    return await _write(lu, cmd, lba, blocks, bool(flags & 0x08), 7)  # type: ignore[arg-type]


@command(0xAA, "WRITE(12)", _usage(_RW12, 0xAA), access=Access.WRITE, timeout=_RW_TIMEOUT)
async def write12(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    _, flags, lba, blocks, _, _ = _CDB12.unpack_from(cmd.cdb)
    return await _write(lu, cmd, lba, blocks, bool(flags & 0x08), 6)  # type: ignore[arg-type]


@command(0x8A, "WRITE(16)", _usage(_RW16, 0x8A), access=Access.WRITE, timeout=_RW_TIMEOUT)
async def write16(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    _, flags, lba, blocks, _, _ = _CDB16.unpack_from(cmd.cdb)
    dev = lu.device  # type: ignore[union-attr]
    data = cmd.data_out
    want = blocks * dev.block_size
    if (
        lu.started  # type: ignore[union-attr]
        and lba + blocks <= dev.num_blocks
        and 0 < blocks <= lu.max_transfer_blocks  # type: ignore[union-attr]
        and len(data) == want
        and not dev.read_only
        and not lu.software_write_protect  # type: ignore[union-attr]
    ):
        await dev.write(lba, data, bool(flags & 0x08) or not lu.write_cache, cmd.nexus)  # type: ignore[union-attr]
        return ScsiResult(_GOOD, b"", b"", want)
    return await _write(lu, cmd, lba, blocks, bool(flags & 0x08), 10)  # type: ignore[arg-type]


# -- WRITE AND VERIFY / VERIFY ------------------------------------------------------------

# byte 1: DPO 0x10, BYTCHK 0x06 (WRITE AND VERIFY: 0x02 only)
_WV1 = 0x12


@command(
    0x2E,
    "WRITE AND VERIFY(10)",
    _usage(_RW10, 0x2E, _WV1),
    access=Access.WRITE,
    timeout=_RW_TIMEOUT,
)
async def write_verify10(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    _, _, lba, _, blocks, _ = _CDB10.unpack_from(cmd.cdb)
    return await _write(lu, cmd, lba, blocks, True, 7)  # type: ignore[arg-type]


@command(
    0xAE,
    "WRITE AND VERIFY(12)",
    _usage(_RW12, 0xAE, _WV1),
    access=Access.WRITE,
    timeout=_RW_TIMEOUT,
)
async def write_verify12(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    _, _, lba, blocks, _, _ = _CDB12.unpack_from(cmd.cdb)
    return await _write(lu, cmd, lba, blocks, True, 6)  # type: ignore[arg-type]


@command(
    0x8E,
    "WRITE AND VERIFY(16)",
    _usage(_RW16, 0x8E, _WV1),
    access=Access.WRITE,
    timeout=_RW_TIMEOUT,
)
async def write_verify16(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    _, _, lba, blocks, _, _ = _CDB16.unpack_from(cmd.cdb)
    return await _write(lu, cmd, lba, blocks, True, 10)  # type: ignore[arg-type]


async def _verify(
    lu: LogicalUnit, cmd: ScsiCommand, lba: int, blocks: int, bytchk: int, length_byte: int
) -> ScsiResult:
    _range(lu, lba, blocks)
    if bytchk == 2:
        raise invalid_cdb(1, 2)
    if blocks > lu.max_transfer_blocks:
        raise invalid_cdb(length_byte)
    dev = lu.device
    bs = dev.block_size
    if not blocks:
        return ScsiResult(_GOOD, b"", b"", 0 if bytchk else None)
    stored = bytes(await dev.read(lba, blocks))
    if not bytchk:
        return ScsiResult()
    want = bs if bytchk == 3 else blocks * bs
    if len(cmd.data_out) < want:
        raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
    expect = bytes(cmd.data_out[:want])
    if bytchk == 3:
        expect *= blocks  # one block compared with each block of the range
    if stored != expect:
        offset = next(i for i in range(len(stored)) if stored[i] != expect[i])
        raise CheckCondition(MISCOMPARE_DURING_VERIFY, information=offset)
    return ScsiResult(_GOOD, b"", b"", want)


_V1 = 0x16  # DPO, BYTCHK (VRPROTECT not supported)


@command(0x2F, "VERIFY(10)", _usage(_RW10, 0x2F, _V1), access=Access.READ, timeout=_RW_TIMEOUT)
async def verify10(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    _, flags, lba, _, blocks, _ = _CDB10.unpack_from(cmd.cdb)
    return await _verify(lu, cmd, lba, blocks, (flags >> 1) & 3, 7)  # type: ignore[arg-type]


@command(0xAF, "VERIFY(12)", _usage(_RW12, 0xAF, _V1), access=Access.READ, timeout=_RW_TIMEOUT)
async def verify12(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    _, flags, lba, blocks, _, _ = _CDB12.unpack_from(cmd.cdb)
    return await _verify(lu, cmd, lba, blocks, (flags >> 1) & 3, 6)  # type: ignore[arg-type]


@command(0x8F, "VERIFY(16)", _usage(_RW16, 0x8F, _V1), access=Access.READ, timeout=_RW_TIMEOUT)
async def verify16(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    _, flags, lba, blocks, _, _ = _CDB16.unpack_from(cmd.cdb)
    return await _verify(lu, cmd, lba, blocks, (flags >> 1) & 3, 10)  # type: ignore[arg-type]


# -- SYNCHRONIZE CACHE / PRE-FETCH --------------------------------------------------------


async def _sync(lu: LogicalUnit, lba: int, blocks: int) -> ScsiResult:
    _range(lu, lba, blocks)
    await lu.device.flush()
    return ScsiResult()


@command(
    0x35, "SYNCHRONIZE CACHE(10)", _usage(_RW10, 0x35, 0x06), access=Access.WRITE, timeout=(60, 120)
)
async def sync_cache10(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    _, _, lba, _, blocks, _ = _CDB10.unpack_from(cmd.cdb)
    return await _sync(lu, lba, blocks)  # type: ignore[arg-type]


@command(
    0x91, "SYNCHRONIZE CACHE(16)", _usage(_RW16, 0x91, 0x06), access=Access.WRITE, timeout=(60, 120)
)
async def sync_cache16(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    _, _, lba, blocks, _, _ = _CDB16.unpack_from(cmd.cdb)
    return await _sync(lu, lba, blocks)  # type: ignore[arg-type]


async def _prefetch(lu: LogicalUnit, lba: int, blocks: int) -> ScsiResult:
    _range(lu, lba, blocks)
    # Nothing is cached here beyond the page cache; SBC-3 then answers CONDITION MET only
    # when the blocks fit in the cache, which we cannot promise: GOOD.
    return ScsiResult()


@command(0x34, "PRE-FETCH(10)", _usage(_RW10, 0x34, 0x02), access=Access.READ)
async def prefetch10(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    _, _, lba, _, blocks, _ = _CDB10.unpack_from(cmd.cdb)
    return await _prefetch(lu, lba, blocks)  # type: ignore[arg-type]


@command(0x90, "PRE-FETCH(16)", _usage(_RW16, 0x90, 0x02), access=Access.READ)
async def prefetch16(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    _, _, lba, blocks, _, _ = _CDB16.unpack_from(cmd.cdb)
    return await _prefetch(lu, lba, blocks)  # type: ignore[arg-type]


# -- UNMAP / WRITE SAME -------------------------------------------------------------------


@command(
    0x42,
    "UNMAP",
    [0x42, 0, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0x00],
    access=Access.WRITE,
    timeout=(60, 120),
)
async def unmap(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None
    dev = lu.device
    if not dev.thin:
        raise CheckCondition(INVALID_COMMAND_OPERATION_CODE)  # UNMAP needs LBPU
    if not lu.started:
        check_ready(lu)
    length = int.from_bytes(cmd.cdb[7:9], "big")
    if length == 0:
        return ScsiResult(_GOOD, b"", b"", 0)
    if length < 8:
        raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
    data = bytes(cmd.data_out[:length])
    if len(data) < 8:
        raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
    _writable(lu)
    data_length = int.from_bytes(data[0:2], "big")
    desc_length = int.from_bytes(data[2:4], "big")
    if desc_length % 16:
        raise invalid_param(2)
    if data_length < desc_length + 6:
        raise invalid_param(0)  # UNMAP DATA LENGTH must cover the descriptors it announces
    count = min(desc_length, len(data) - 8) // 16
    if count > lu.max_unmap_descriptors:
        raise invalid_param(2)
    ranges: list[tuple[int, int]] = []
    total = 0
    for i in range(count):
        off = 8 + 16 * i
        lba = int.from_bytes(data[off : off + 8], "big")
        blocks = int.from_bytes(data[off + 8 : off + 12], "big")
        if lba + blocks > dev.num_blocks:
            raise CheckCondition(_OOR)
        total += blocks
        if blocks:
            ranges.append((lba, blocks))
    if total > lu.max_unmap_blocks:
        raise invalid_param(8 + 8)
    if ranges:
        await dev.unmap(ranges, cmd.nexus)
    return ScsiResult(_GOOD, b"", b"", length)


async def _write_same(
    lu: LogicalUnit, cmd: ScsiCommand, lba: int, blocks: int, flags: int, length_byte: int
) -> ScsiResult:
    dev = lu.device
    if flags & 0x10:
        raise invalid_cdb(1, 4)  # ANCHOR: anchored blocks are not supported
    unmap_bit = bool(flags & 0x08)
    ndob = bool(flags & 0x01)
    if unmap_bit and not dev.thin:
        raise invalid_cdb(1, 3)
    _range(lu, lba, blocks)  # first: libiscsi expects LBA OUT OF RANGE even for 0 blocks
    if blocks == 0:
        raise invalid_cdb(length_byte)  # WSNZ=1
    if blocks > lu.max_write_same_blocks:
        raise invalid_cdb(length_byte)
    _writable(lu)
    bs = dev.block_size
    if ndob:
        pattern: bytes | memoryview = bytes(bs)
    else:
        if len(cmd.data_out) != bs:  # exactly one block, or the initiator mis-sized it
            raise invalid_cdb(length_byte)
        pattern = memoryview(cmd.data_out)
    await dev.write_same(lba, blocks, pattern, unmap_bit, cmd.nexus)
    return ScsiResult(_GOOD, b"", b"", 0 if ndob else bs)


@command(
    0x41,
    "WRITE SAME(10)",
    [0x41, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x00],
    access=Access.WRITE,
    timeout=(60, 120),
)
async def write_same10(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    _, flags, lba, _, blocks, _ = _CDB10.unpack_from(cmd.cdb)
    return await _write_same(lu, cmd, lba, blocks, flags, 7)  # type: ignore[arg-type]


@command(
    0x93,
    "WRITE SAME(16)",
    [0x93, 0x09] + [0xFF] * 12 + [0x1F, 0x00],
    access=Access.WRITE,
    timeout=(60, 120),
)
async def write_same16(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    _, flags, lba, blocks, _, _ = _CDB16.unpack_from(cmd.cdb)
    return await _write_same(lu, cmd, lba, blocks, flags, 10)  # type: ignore[arg-type]


# -- COMPARE AND WRITE --------------------------------------------------------------------


@command(
    0x89,
    "COMPARE AND WRITE",
    [0x89, 0x1A] + [0xFF] * 8 + [0, 0, 0, 0xFF, 0x1F, 0x00],
    access=Access.WRITE,
    timeout=_RW_TIMEOUT,
)
async def compare_and_write(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None
    cdb = cmd.cdb
    lba = int.from_bytes(cdb[2:10], "big")
    blocks = cdb[13]
    if blocks > lu.max_compare_write_blocks:
        raise invalid_cdb(13)
    _range(lu, lba, blocks)
    n = blocks * lu.device.block_size
    data = memoryview(cmd.data_out)
    if len(data) != 2 * n:
        # verify and write data, exactly; this also refuses 256 blocks wrapped to 0 in the CDB
        raise invalid_cdb(13)
    if not blocks:
        return ScsiResult(_GOOD, b"", b"", 0)
    _writable(lu)
    await lu.device.compare_and_write(lba, data[:n], data[n : 2 * n], cmd.nexus)
    return ScsiResult(_GOOD, b"", b"", 2 * n)


# -- ORWRITE -------------------------------------------------------------------------------

# byte 1: ORPROTECT 0xE0 (not in the mask: no protection information), DPO 0x10, FUA 0x08,
# FUA_NV 0x02
_ORWRITE_RETRIES = 64


@command(
    0x8B,
    "ORWRITE(16)",
    [0x8B, 0x1A] + [0xFF] * 12 + [0x1F, 0x00],
    access=Access.WRITE,
    timeout=_RW_TIMEOUT,
)
async def orwrite16(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    """ORWRITE(16): each block becomes (old OR data-out), atomically. Built on the device's
    atomic compare-and-write so it stays atomic on every device, the replicated volume included:
    read, OR, then compare-and-write against what was read; a concurrent write in between makes
    the compare fail and the whole step is retried."""
    assert lu is not None
    _, flags, lba, blocks, _, _ = _CDB16.unpack_from(cmd.cdb)
    dev = lu.device  # ORPROTECT (byte 1, 0xE0) is refused by the usage mask already
    _range(lu, lba, blocks)
    if blocks > lu.max_transfer_blocks:
        raise invalid_cdb(10)
    _writable(lu)
    want = blocks * dev.block_size
    data = memoryview(cmd.data_out)[: len(cmd.data_out) // dev.block_size * dev.block_size]
    n = len(data) // dev.block_size
    if n == 0:
        return ScsiResult(_GOOD, b"", b"", want)
    mask = int.from_bytes(data, "little")
    for _ in range(_ORWRITE_RETRIES):
        old = bytes(await dev.read(lba, n))
        new = (int.from_bytes(old, "little") | mask).to_bytes(len(old), "little")
        try:
            await dev.compare_and_write(lba, old, new, cmd.nexus)
        except Miscompare:
            continue  # another write landed between the read and the swap: redo with it
        if flags & 0x08 or not lu.write_cache:
            await dev.flush()
        return ScsiResult(_GOOD, b"", b"", want)
    return ScsiResult(Status.BUSY, b"", b"", want)  # kept losing races: let the initiator retry


# -- GET LBA STATUS -----------------------------------------------------------------------


@command(
    0x9E,
    "GET LBA STATUS",
    [0x9E, 0x12] + [0xFF] * 12 + [0, 0x00],
    service_action=0x12,
    access=Access.READ,
)
async def get_lba_status(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None
    cdb = cmd.cdb
    lba = int.from_bytes(cdb[2:10], "big")
    alloc = int.from_bytes(cdb[10:14], "big")
    if not lu.started:
        check_ready(lu)
    dev = lu.device
    if lba >= dev.num_blocks:
        raise CheckCondition(_OOR)
    runs = await dev.lba_status(lba) if dev.thin else []
    if not runs:
        runs = []
    out = bytearray()
    room = max(0, (alloc - 8) // 16) if alloc >= 8 else 0
    for run in list(runs)[: max(room, 1)]:
        state = 1 if run.state is LbaState.DEALLOCATED else 0
        out += run.lba.to_bytes(8, "big") + min(run.blocks, 0xFFFFFFFF).to_bytes(4, "big")
        out += bytes((state, 0, 0, 0))
    if not out:  # a dense device: everything from lba on is mapped
        blocks = min(dev.num_blocks - lba, 0xFFFFFFFF)
        out += lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + bytes(4)
    return data_result((len(out) + 4).to_bytes(4, "big") + bytes(4) + bytes(out), alloc)


# -- READ DEFECT DATA ---------------------------------------------------------------------
# A virtual volume has no defects: both lists are valid and empty, in the format asked for.


@command(0x37, "READ DEFECT DATA(10)", [0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0x00])
async def read_defect_data10(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    flags = cmd.cdb[2] & 0x1F
    alloc = int.from_bytes(cmd.cdb[7:9], "big")
    return data_result(bytes((0, flags, 0, 0)), alloc)


@command(0xB7, "READ DEFECT DATA(12)", [0xB7, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x00])
async def read_defect_data12(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    flags = cmd.cdb[1] & 0x1F
    alloc = int.from_bytes(cmd.cdb[6:10], "big")
    return data_result(bytes((0, flags)) + bytes(6), alloc)
