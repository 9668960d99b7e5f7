"""FileBlockDevice on a real sparse file in a temporary directory."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunastor.chunk.access import filedev
from lunastor.chunk.access.filedev import FileBlockDevice
from lunastor.iscsi.blockdev import (
    BlockDevice,
    LbaState,
    LbaStatus,
    Miscompare,
    OutOfRange,
    WriteProtected,
)
from lunastor.iscsi.scsi.target import LogicalUnit, ScsiTarget
from lunastor.iscsi.scsi.types import ScsiCommand, Status
from tests.unit.scsi.harness import NAA, TARGET, A

MIB = 1 << 20


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[FileBlockDevice]:
    d = FileBlockDevice(tmp_path / "vol", size=8 * MIB)
    yield d
    d.close()


def allocated(dev: FileBlockDevice) -> int:
    return os.stat(dev.path).st_blocks * 512


def seek_data_lbas(dev: FileBlockDevice) -> set[int]:
    """The logical blocks SEEK_DATA/SEEK_HOLE call mapped, computed independently."""
    fd = os.open(dev.path, os.O_RDONLY)
    try:
        end = dev.num_blocks * dev.block_size
        mapped: set[int] = set()
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO
                break
            stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            mapped.update(range(start // dev.block_size, -(-stop // dev.block_size)))
            pos = stop
        return mapped
    finally:
        os.close(fd)


def status_lbas(runs: list[LbaStatus]) -> tuple[set[int], set[int]]:
    mapped: set[int] = set()
    free: set[int] = set()
    for r in runs:
        (mapped if r.state is LbaState.MAPPED else free).update(range(r.lba, r.lba + r.blocks))
    return mapped, free


def test_is_a_block_device(dev: FileBlockDevice) -> None:
    assert isinstance(dev, BlockDevice)
    assert dev.num_blocks == 8 * MIB // 512
    assert dev.thin


async def test_new_file_is_sparse_and_reads_zeros(dev: FileBlockDevice) -> None:
    assert allocated(dev) == 0
    assert await dev.read(100, 8) == bytes(4096)
    runs = await dev.lba_status(0)
    assert runs == [LbaStatus(0, dev.num_blocks, LbaState.DEALLOCATED)]


async def test_write_read_roundtrip_and_fua(dev: FileBlockDevice) -> None:
    data = os.urandom(64 * 1024)
    await dev.write(2048, data, fua=True)
    assert await dev.read(2048, 128) == data
    await dev.flush()
    assert allocated(dev) >= len(data)


async def test_unmap_punches_holes(dev: FileBlockDevice) -> None:
    await dev.write(0, b"\x55" * MIB, fua=False)
    before = allocated(dev)
    assert before >= MIB
    await dev.unmap([(0, 1024)])  # first 512 KiB
    assert allocated(dev) <= before - 512 * 1024
    assert await dev.read(0, 1024) == bytes(512 * 1024)
    assert await dev.read(1024, 1) == b"\x55" * 512
    mapped, free = status_lbas(list(await dev.lba_status(0)))
    assert free >= set(range(1024))
    assert 1024 in mapped


async def test_write_same_zero_punches_and_pattern_fills(dev: FileBlockDevice) -> None:
    await dev.write_same(0, 2048, b"\xab" * 512, unmap=False)
    assert await dev.read(2047, 1) == b"\xab" * 512
    assert allocated(dev) >= MIB
    await dev.write_same(0, 2048, bytes(512), unmap=True)
    assert allocated(dev) == 0
    assert await dev.read(0, 8) == bytes(4096)


async def test_lba_status_agrees_with_seek_data(dev: FileBlockDevice) -> None:
    for lba in (0, 8, 4096, 4104, 9000, 16376):
        await dev.write(lba, b"\x01" * 4096, fua=False)
    await dev.unmap([(4096, 8)])
    runs: list[LbaStatus] = []
    lba = 0
    while lba < dev.num_blocks:
        chunk = list(await dev.lba_status(lba))
        assert chunk and chunk[0].lba == lba
        runs += chunk
        lba = chunk[-1].lba + chunk[-1].blocks
    mapped, free = status_lbas(runs)
    assert mapped | free == set(range(dev.num_blocks)) and not mapped & free
    assert mapped == seek_data_lbas(dev)


async def test_compare_and_write(dev: FileBlockDevice) -> None:
    await dev.write(10, b"a" * 512, fua=False)
    await dev.compare_and_write(10, b"a" * 512, b"b" * 512)
    assert await dev.read(10, 1) == b"b" * 512
    with pytest.raises(Miscompare) as info:
        await dev.compare_and_write(10, b"b" * 100 + b"x" * 412, b"c" * 512)
    assert info.value.offset == 100
    assert await dev.read(10, 1) == b"b" * 512


async def test_out_of_range_and_read_only(tmp_path: Path, dev: FileBlockDevice) -> None:
    with pytest.raises(OutOfRange):
        await dev.read(dev.num_blocks, 1)
    with pytest.raises(OutOfRange):
        await dev.write(dev.num_blocks - 1, bytes(1024), fua=False)
    ro = FileBlockDevice(dev.path, read_only=True)
    try:
        assert ro.read_only
        with pytest.raises(WriteProtected):
            await ro.write(0, bytes(512), fua=False)
        with pytest.raises(WriteProtected):
            await ro.unmap([(0, 8)])
    finally:
        ro.close()


async def test_resize_bumps_capacity_generation(dev: FileBlockDevice) -> None:
    gen = dev.capacity_generation
    dev.resize(dev.num_blocks * 2)
    assert dev.capacity_generation == gen + 1
    assert os.stat(dev.path).st_size == 16 * MIB
    assert await dev.read(dev.num_blocks - 1, 1) == bytes(512)


async def test_through_the_scsi_target(dev: FileBlockDevice) -> None:
    """The file device behind a real ScsiTarget: data, holes and provisioning status."""
    target = ScsiTarget(TARGET, {0: LogicalUnit(dev, naa_id=NAA, serial="F")})

    async def cmd(cdb: list[int], data: bytes = b""):  # type: ignore[no-untyped-def]
        return await target.execute(ScsiCommand(A, 0, bytes(cdb), 1, data_out=data))

    def status_at(data: bytes) -> tuple[int, int, int]:
        return (
            int.from_bytes(data[8:16], "big"),
            int.from_bytes(data[16:20], "big"),
            data[20],
        )

    await cmd([0] * 6)  # POWER ON
    payload = os.urandom(64 * 1024)
    assert (
        await cmd([0x8A, 0x08, *(0).to_bytes(8, "big"), *(128).to_bytes(4, "big"), 0, 0], payload)
    ).status == Status.GOOD
    r = await cmd([0x88, 0, *(0).to_bytes(8, "big"), *(128).to_bytes(4, "big"), 0, 0])
    assert bytes(r.data_in) == payload
    lbas = [0x9E, 0x12, *(0).to_bytes(8, "big"), *(24).to_bytes(4, "big"), 0, 0]
    assert status_at(bytes((await cmd(lbas)).data_in)) == (0, 128, 0)  # mapped
    unmap = (22).to_bytes(2, "big") + (16).to_bytes(2, "big") + bytes(4)
    unmap += (0).to_bytes(8, "big") + (64).to_bytes(4, "big") + bytes(4)
    assert (await cmd([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], unmap)).status == Status.GOOD
    assert status_at(bytes((await cmd(lbas)).data_in)) == (0, 64, 1)  # deallocated
    r = await cmd([0x88, 0, *(0).to_bytes(8, "big"), *(128).to_bytes(4, "big"), 0, 0])
    assert bytes(r.data_in) == bytes(32 * 1024) + payload[32 * 1024 :]
    ws = [0x93, 0x08, *(64).to_bytes(8, "big"), *(64).to_bytes(4, "big"), 0, 0]
    assert (await cmd(ws, bytes(512))).status == Status.GOOD
    assert status_at(bytes((await cmd(lbas)).data_in))[1:] == (dev.num_blocks, 1)
    assert allocated(dev) == 0
    caw = [0x89, 0, *(5).to_bytes(8, "big"), 0, 0, 0, 1, 0, 0]
    r = await cmd(caw, b"\x00" * 7 + b"\x01" + bytes(504) + b"n" * 512)
    assert r.status == Status.CHECK_CONDITION and r.sense[2] == 0x0E
    assert int.from_bytes(r.sense[3:7], "big") == 7  # offset of the first difference


async def test_without_hole_punching_unmap_writes_zeros(
    dev: FileBlockDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a filesystem that refuses PUNCH_HOLE, deallocation still reads back as zeros."""

    def refuse(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "no hole punching here")

    monkeypatch.setattr(filedev, "punch_hole", refuse)
    await dev.write(0, b"\x33" * 8192, fua=False)
    await dev.unmap([(2, 4)])
    assert await dev.read(0, 16) == b"\x33" * 1024 + bytes(2048) + b"\x33" * 5120
