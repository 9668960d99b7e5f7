"""A block device over one local sparse file.

Reads and writes are plain `os.pread`/`os.pwrite` on the event loop thread: they hit the
page cache and cost a few microseconds, less than a hop to a thread pool. What can block for
milliseconds (fdatasync for FUA and SYNCHRONIZE CACHE) runs in the default executor. UNMAP and
WRITE SAME with zeros punch holes (fallocate PUNCH_HOLE|KEEP_SIZE), so deallocated blocks
take no space and read as zeros; `lba_status` reports them from SEEK_DATA/SEEK_HOLE.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
from collections.abc import Sequence

from lunastor.iscsi.blockdev import (
    BlockDeviceError,
    LbaState,
    LbaStatus,
    MediumError,
    Miscompare,
    OutOfRange,
    SpaceExhausted,
    WriteProtected,
)
from lunastor.iscsi.buffers import BufferPool
from lunastor.iscsi.scsi.types import Nexus

Buffer = bytes | bytearray | memoryview

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_FILL_CHUNK = 1 << 20  # WRITE SAME writes its pattern in pieces of this many bytes
_MAX_RUNS = 64  # GET LBA STATUS descriptors per call
_POOLED_READ = 64 << 10  # reads of at least this many bytes go into pooled buffers

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _append(runs: list[LbaStatus], run: LbaStatus) -> None:
    if runs and runs[-1].state is run.state and runs[-1].lba + runs[-1].blocks == run.lba:
        runs[-1] = LbaStatus(runs[-1].lba, runs[-1].blocks + run.blocks, run.state)
    else:
        runs.append(run)


def _device_error(e: OSError, lba: int, write: bool) -> BlockDeviceError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpaceExhausted(str(e))
    if e.errno == errno.EIO:
        return MediumError(str(e), lba=lba, write=write)
    if e.errno in (errno.EROFS, errno.EPERM, errno.EACCES, errno.EBADF) and write:
        return WriteProtected(str(e))
    return BlockDeviceError(str(e))


class FileBlockDevice:
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        size: int | None = None,
        block_size: int = 512,
        physical_block_size: int = 4096,
        read_only: bool = False,
    ) -> None:
        """Open `path` (created with `size` bytes when given and missing or smaller)."""
        if physical_block_size % block_size:
            raise ValueError("physical block size must be a multiple of the block size")
        self._path = os.fspath(path)
        flags = os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT
        self._fd = os.open(self._path, flags | os.O_CLOEXEC, 0o600)
        if size is not None and not read_only and os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)
        self._bs = block_size
        self._pbs = physical_block_size
        self._read_only = read_only
        self._num_blocks = os.fstat(self._fd).st_size // block_size
        self._generation = 0
        self._caw_lock = asyncio.Lock()
        self._fill: tuple[bytes, bytes] | None = None  # (pattern, repeated pattern) reused
        self._pool = BufferPool(max_pooled=8 << 20)  # large reads: no fresh buffer each

    # -- properties -------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._path

    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def physical_block_size(self) -> int:
        return self._pbs

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def thin(self) -> bool:
        return True

    @property
    def capacity_generation(self) -> int:
        return self._generation

    def resize(self, num_blocks: int) -> None:
        """Grow or shrink the file; initiators then get CAPACITY DATA HAS CHANGED."""
        if self._read_only:
            raise WriteProtected("device is read-only")
        os.ftruncate(self._fd, num_blocks * self._bs)
        self._num_blocks = num_blocks
        self._generation += 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- helpers ----------------------------------------------------------------------------
    def _check(self, lba: int, blocks: int) -> None:
        if lba < 0 or blocks < 0 or lba + blocks > self._num_blocks:
            raise OutOfRange(f"lba {lba} + {blocks} beyond {self._num_blocks}")

    def _check_write(self, lba: int, blocks: int) -> None:
        self._check(lba, blocks)
        if self._read_only:
            raise WriteProtected("device is read-only")

    def _pwrite_all(self, data: Buffer, offset: int, lba: int) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self._fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as e:
            raise _device_error(e, lba, True) from e

    async def _sync(self, lba: int) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, self._fd)
        except OSError as e:
            raise _device_error(e, lba, True) from e

    def _punch(self, lba: int, blocks: int) -> None:
        try:
            punch_hole(self._fd, lba * self._bs, blocks * self._bs)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise _device_error(e, lba, True) from e
            # a filesystem without hole punching: zeros keep LBPRZ true, without the space
            self._write_zeros(lba * self._bs, blocks * self._bs, lba)

    def _write_zeros(self, offset: int, length: int, lba: int) -> None:
        zeros = bytes(min(length, _FILL_CHUNK))
        while length:
            n = min(length, len(zeros))
            self._pwrite_all(memoryview(zeros)[:n], offset, lba)
            offset += n
            length -= n

    # -- inline I/O (blockdev.InlineBlockDevice: the iSCSI fast path) ---------------------
    inline_ok = True  # pread/pwrite on the loop thread: the page cache, microseconds

    def read_inline(self, lba: int, blocks: int) -> Buffer:
        self._check(lba, blocks)
        size = blocks * self._bs
        offset = lba * self._bs
        if size >= _POOLED_READ:
            # preadv into a pooled buffer; the view returned keeps it from being reused
            # until whoever sends it (a transport) lets go of it
            view = memoryview(self._pool.take(size))[:size]
            got = 0
            try:
                while got < size:
                    n = os.preadv(self._fd, [view[got:]], offset + got)
                    if not n:
                        break
                    got += n
            except OSError as e:
                raise _device_error(e, lba, False) from e
            if got < size:  # the file was shortened under us: the rest reads as zeros
                view[got:] = bytes(size - got)
            return view
        try:
            data = os.pread(self._fd, size, offset)
        except OSError as e:
            raise _device_error(e, lba, False) from e
        if len(data) < size:  # the file was shortened under us: the rest reads as zeros
            data += bytes(size - len(data))
        return data

    def write_inline(self, lba: int, data: Buffer) -> None:
        if len(data) % self._bs:
            raise ValueError("write length is not a multiple of the block size")
        self._check_write(lba, len(data) // self._bs)
        self._pwrite_all(data, lba * self._bs, lba)

    # -- BlockDevice ------------------------------------------------------------------------
    async def read(self, lba: int, blocks: int) -> Buffer:
        return self.read_inline(lba, blocks)

    async def write(self, lba: int, data: Buffer, fua: bool, nexus: Nexus | None = None) -> None:
        self.write_inline(lba, data)
        if fua:
            await self._sync(lba)

    async def flush(self) -> None:
        await self._sync(0)

    async def unmap(self, ranges: Sequence[tuple[int, int]], nexus: Nexus | None = None) -> None:
        for lba, blocks in ranges:
            self._check_write(lba, blocks)
        for lba, blocks in ranges:
            if blocks:
                self._punch(lba, blocks)

    async def write_same(
        self, lba: int, blocks: int, pattern: Buffer, unmap: bool, nexus: Nexus | None = None
    ) -> None:
        if len(pattern) != self._bs:
            raise ValueError("write same pattern must be one block")
        self._check_write(lba, blocks)
        if not blocks:
            return
        pattern = bytes(pattern)
        if not any(pattern):
            # zeros on a thin device: deallocate (reads return zeros, LBPRZ=1)
            self._punch(lba, blocks)
            return
        if self._fill is None or self._fill[0] != pattern:
            self._fill = (pattern, pattern * max(1, _FILL_CHUNK // self._bs))
        fill = self._fill[1]
        offset, remaining = lba * self._bs, blocks * self._bs
        while remaining:
            n = min(remaining, len(fill))
            self._pwrite_all(memoryview(fill)[:n], offset, lba)
            offset += n
            remaining -= n

    async def compare_and_write(
        self, lba: int, verify: Buffer, data: Buffer, nexus: Nexus | None = None
    ) -> None:
        if len(verify) != len(data) or len(data) % self._bs:
            raise ValueError("compare and write buffers must be equal whole blocks")
        blocks = len(data) // self._bs
        self._check_write(lba, blocks)
        async with self._caw_lock:
            current = await self.read(lba, blocks)
            if current != verify:
                expect = bytes(verify)
                raise Miscompare(next(i for i in range(len(expect)) if current[i] != expect[i]))
            self._pwrite_all(data, lba * self._bs, lba)

    async def lba_status(self, lba: int) -> Sequence[LbaStatus]:
        self._check(lba, 1)
        end = self._num_blocks * self._bs
        pos = lba * self._bs
        runs: list[LbaStatus] = []
        while pos < end and len(runs) < _MAX_RUNS:
            try:
                data_at = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise _device_error(e, lba, False) from e
                data_at = end  # no data after pos
            data_at = min(data_at, end)
            start_lba = pos // self._bs
            # a logical block that holds any data is mapped, so a hole run stops at the
            # block in which data starts
            stop_lba = data_at // self._bs if data_at < end else self._num_blocks
            if stop_lba > start_lba:
                _append(runs, LbaStatus(start_lba, stop_lba - start_lba, LbaState.DEALLOCATED))
                pos = stop_lba * self._bs
                continue
            hole_at = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
            stop_lba = max(-(-hole_at // self._bs), start_lba + 1)
            _append(runs, LbaStatus(start_lba, stop_lba - start_lba, LbaState.MAPPED))
            pos = stop_lba * self._bs
        return runs
