"""MemoryBlockDevice: thin semantics the SCSI tests rely on."""

from __future__ import annotations

import pytest

from lunastor.iscsi.blockdev import BlockDevice, LbaState, LbaStatus, OutOfRange, WriteProtected
from lunastor.iscsi.memdev import MemoryBlockDevice


async def test_unwritten_blocks_read_zero_and_are_deallocated() -> None:
    dev = MemoryBlockDevice(64)
    assert isinstance(dev, BlockDevice)
    assert await dev.read(0, 64) == bytes(64 * 512)
    assert await dev.lba_status(3) == [LbaStatus(3, 61, LbaState.DEALLOCATED)]


async def test_runs_follow_physical_blocks() -> None:
    dev = MemoryBlockDevice(64)
    await dev.write(9, b"\x01" * 512, fua=False)  # maps physical block 1 (LBAs 8..15)
    assert await dev.lba_status(0) == [
        LbaStatus(0, 8, LbaState.DEALLOCATED),
        LbaStatus(8, 8, LbaState.MAPPED),
        LbaStatus(16, 48, LbaState.DEALLOCATED),
    ]
    await dev.unmap([(9, 1)])  # part of a physical block: zeroed, and freed once all zero
    assert await dev.read(9, 1) == bytes(512)
    assert (await dev.lba_status(8))[0].state is LbaState.DEALLOCATED


async def test_write_same_and_compare_and_write() -> None:
    dev = MemoryBlockDevice(64)
    await dev.write_same(4, 20, b"\x07" * 512, unmap=False)
    assert await dev.read(4, 20) == b"\x07" * 512 * 20
    await dev.write_same(0, 64, bytes(512), unmap=True)
    assert await dev.lba_status(0) == [LbaStatus(0, 64, LbaState.DEALLOCATED)]
    await dev.compare_and_write(1, bytes(512), b"\x09" * 512)
    assert await dev.read(1, 1) == b"\x09" * 512


async def test_errors_and_resize() -> None:
    dev = MemoryBlockDevice(64, read_only=True)
    with pytest.raises(OutOfRange):
        await dev.read(63, 2)
    with pytest.raises(WriteProtected):
        await dev.write(0, bytes(512), fua=False)
    dev = MemoryBlockDevice(64)
    await dev.write(60, b"\x01" * 2048, fua=True)
    dev.resize(62)
    assert dev.capacity_generation == 1 and dev.num_blocks == 62
    dev.resize(64)
    assert await dev.read(62, 2) == bytes(1024)  # shrinking dropped the tail
