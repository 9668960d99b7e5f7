"""A thin block device in memory: for tests, and a model of what the others must do.

Storage is a dict of physical blocks (4 KiB by default); a physical block never written, or
wholly unmapped, holds no memory, reads as zeros and is reported DEALLOCATED.
"""

from __future__ import annotations

from collections.abc import Sequence

from lunastor.iscsi.blockdev import (
    LbaState,
    LbaStatus,
    Miscompare,
    OutOfRange,
    WriteProtected,
)
from lunastor.iscsi.scsi.types import Nexus

Buffer = bytes | bytearray | memoryview


class MemoryBlockDevice:
    def __init__(
        self,
        num_blocks: int,
        *,
        block_size: int = 512,
        physical_block_size: int = 4096,
        read_only: bool = False,
        thin: bool = True,
    ) -> None:
        if physical_block_size % block_size:
            raise ValueError("physical block size must be a multiple of the block size")
        self._bs = block_size
        self._pbs = physical_block_size
        self._per = physical_block_size // block_size
        self._num_blocks = num_blocks
        self._read_only = read_only
        self._thin = thin
        self._generation = 0
        self._chunks: dict[int, bytearray] = {}
        self._zero = bytes(physical_block_size)
        self.flushes = 0  # counted so tests can see FUA / SYNCHRONIZE CACHE reach the device
        self.fua_writes = 0

    # -- properties -------------------------------------------------------------------------
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
        return self._thin

    @property
    def capacity_generation(self) -> int:
        return self._generation

    def resize(self, num_blocks: int) -> None:
        """Change the capacity; blocks beyond a shrunk end are dropped."""
        if num_blocks < self._num_blocks:
            last = -(-num_blocks // self._per)
            for idx in [i for i in self._chunks if i >= last]:
                del self._chunks[idx]
            if num_blocks % self._per and (num_blocks // self._per) in self._chunks:
                chunk = self._chunks[num_blocks // self._per]
                start = (num_blocks % self._per) * self._bs
                chunk[start:] = bytes(len(chunk) - start)
        self._num_blocks = num_blocks
        self._generation += 1

    def set_read_only(self, read_only: bool) -> None:
        self._read_only = read_only

    # -- helpers ----------------------------------------------------------------------------
    def _check(self, lba: int, blocks: int) -> None:
        if lba < 0 or blocks < 0 or lba + blocks > self._num_blocks:
            raise OutOfRange(f"lba {lba} + {blocks} beyond {self._num_blocks}")

    def _check_write(self, lba: int, blocks: int) -> None:
        self._check(lba, blocks)
        if self._read_only:
            raise WriteProtected()

    def _put(self, offset: int, data: Buffer) -> None:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            idx, within = divmod(offset + pos, self._pbs)
            n = min(self._pbs - within, len(view) - pos)
            piece = view[pos : pos + n]
            chunk = self._chunks.get(idx)
            if chunk is None:
                if self._thin and n == self._pbs and piece.tobytes() == self._zero:
                    pos += n
                    continue
                chunk = self._chunks[idx] = bytearray(self._pbs)
            chunk[within : within + n] = piece
            pos += n

    # -- BlockDevice ------------------------------------------------------------------------
    # inline I/O (blockdev.InlineBlockDevice: the iSCSI fast path); tests may turn it off
    inline_ok = True

    def read_inline(self, lba: int, blocks: int) -> Buffer:
        self._check(lba, blocks)
        offset, size = lba * self._bs, blocks * self._bs
        idx, within = divmod(offset, self._pbs)
        if within + size <= self._pbs:
            chunk = self._chunks.get(idx)
            if chunk is None:  # the zero block never changes: a view of it is safe to share
                return memoryview(self._zero)[within : within + size]
            # a copy: a later write must not change data the session has yet to send
            return bytes(chunk[within : within + size])
        out = bytearray(size)
        pos = 0
        while pos < size:
            idx, within = divmod(offset + pos, self._pbs)
            n = min(self._pbs - within, size - pos)
            chunk = self._chunks.get(idx)
            if chunk is not None:
                out[pos : pos + n] = chunk[within : within + n]
            pos += n
        return out

    def write_inline(self, lba: int, data: Buffer) -> None:
        if len(data) % self._bs:
            raise ValueError("write length is not a multiple of the block size")
        self._check_write(lba, len(data) // self._bs)
        self._put(lba * self._bs, data)

    async def read(self, lba: int, blocks: int) -> Buffer:
        return self.read_inline(lba, blocks)

    async def write(self, lba: int, data: Buffer, fua: bool, nexus: Nexus | None = None) -> None:
        self.write_inline(lba, data)
        if fua:
            self.fua_writes += 1

    async def flush(self) -> None:
        self.flushes += 1

    def _deallocate(self, lba: int, blocks: int) -> None:
        start, end = lba * self._bs, (lba + blocks) * self._bs
        pos = start
        while pos < end:
            idx, within = divmod(pos, self._pbs)
            n = min(self._pbs - within, end - pos)
            chunk = self._chunks.get(idx)
            if chunk is not None:
                if n == self._pbs:
                    del self._chunks[idx]
                else:
                    chunk[within : within + n] = bytes(n)
                    if chunk == self._zero:
                        del self._chunks[idx]
            pos += n

    async def unmap(self, ranges: Sequence[tuple[int, int]], nexus: Nexus | None = None) -> None:
        for lba, blocks in ranges:
            self._check_write(lba, blocks)
        for lba, blocks in ranges:
            self._deallocate(lba, blocks)

    async def write_same(
        self, lba: int, blocks: int, pattern: Buffer, unmap: bool, nexus: Nexus | None = None
    ) -> None:
        if len(pattern) != self._bs:
            raise ValueError("write same pattern must be one block")
        self._check_write(lba, blocks)
        if not any(pattern) and (unmap or self._thin):
            self._deallocate(lba, blocks)
            return
        block = bytes(pattern)
        for i in range(blocks):
            self._put((lba + i) * self._bs, block)

    async def compare_and_write(
        self, lba: int, verify: Buffer, data: Buffer, nexus: Nexus | None = None
    ) -> None:
        if len(verify) != len(data) or len(data) % self._bs:
            raise ValueError("compare and write buffers must be equal whole blocks")
        self._check_write(lba, len(data) // self._bs)
        current = bytes(await self.read(lba, len(data) // self._bs))
        expect = bytes(verify)
        if current != expect:
            raise Miscompare(next(i for i in range(len(current)) if current[i] != expect[i]))
        self._put(lba * self._bs, data)

    async def lba_status(self, lba: int) -> Sequence[LbaStatus]:
        self._check(lba, 1)
        runs: list[LbaStatus] = []
        pos = lba
        while pos < self._num_blocks and len(runs) < 64:
            idx = pos // self._per
            state = LbaState.MAPPED if idx in self._chunks else LbaState.DEALLOCATED
            end = min((idx + 1) * self._per, self._num_blocks)
            if runs and runs[-1].state is state:
                last = runs[-1]
                runs[-1] = LbaStatus(last.lba, end - last.lba, state)
            else:
                runs.append(LbaStatus(pos, end - pos, state))
            pos = end
        return runs
