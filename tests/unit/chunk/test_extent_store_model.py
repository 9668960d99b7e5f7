"""Model-based test: random writes, unmaps, reads, flushes and restarts against a bytearray."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lunastor.chunk.store import BLOCK_SIZE, ChecksumMismatch, ExtentStore, Replica
from lunastor.chunk.store.checksums import UNMAPPED, block_checksum

BLOCKS = 16
EXTENT = BLOCKS * BLOCK_SIZE
BOOT = b"M" * 16

ranges = st.integers(0, EXTENT - 1).flatmap(
    lambda off: st.tuples(st.just(off), st.integers(1, min(EXTENT - off, 3 * BLOCK_SIZE)))
)


class ExtentModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="lunastor-model-"))
        self.store = ExtentStore([self.dir], EXTENT, boot_id=BOOT)
        self.replica: Replica = self.run(self.store.create("model", 0, 1))
        self.data = bytearray(EXTENT)
        self.mapped = [False] * BLOCKS
        self.seq = 0
        self.dirty = False  # mutated since the last clean close

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        shutil.rmtree(self.dir)

    @rule(r=ranges, fill=st.integers(1, 255), fua=st.booleans())
    def write(self, r: tuple[int, int], fill: int, fua: bool) -> None:
        offset, length = r
        self.seq += 1
        payload = bytes([fill]) * length
        self.run(self.replica.write(offset, payload, seq=self.seq, gen=1, fua=fua))
        self.dirty = True
        self.data[offset : offset + length] = payload
        for b in range(offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE + 1):
            self.mapped[b] = True

    @rule(r=ranges)
    def unmap(self, r: tuple[int, int]) -> None:
        offset, length = r
        self.seq += 1
        self.run(self.replica.unmap(offset, length, seq=self.seq, gen=1, fua=False))
        self.dirty = True
        self.data[offset : offset + length] = bytes(length)
        end = offset + length
        for b in range(-(-offset // BLOCK_SIZE), end // BLOCK_SIZE):
            self.mapped[b] = False

    @rule(r=ranges)
    def read(self, r: tuple[int, int]) -> None:
        offset, length = r
        assert self.run(self.replica.read(offset, length)) == bytes(
            self.data[offset : offset + length]
        )

    @rule(
        first=st.integers(0, BLOCKS - 1),
        blocks=st.lists(st.none() | st.integers(0, 255), min_size=1, max_size=4),
    )
    def apply_copy(self, first: int, blocks: list[int | None]) -> None:
        """Catch-up: whole blocks with their checksums (None: an unmapped block)."""
        blocks = blocks[: BLOCKS - first]
        data = b"".join(bytes([b or 0]) * BLOCK_SIZE for b in blocks)
        sums = b"".join(
            UNMAPPED if b is None else block_checksum(bytes([b]) * BLOCK_SIZE) for b in blocks
        )
        self.run(self.replica.apply_copy(first * BLOCK_SIZE, data, sums))
        for i, b in enumerate(blocks):
            lo = (first + i) * BLOCK_SIZE
            self.data[lo : lo + BLOCK_SIZE] = bytes([b or 0]) * BLOCK_SIZE
            self.mapped[first + i] = b is not None
        self.dirty = True

    @rule(block=st.integers(0, BLOCKS - 1), at=st.integers(0, BLOCK_SIZE - 1))
    def corrupt_on_disk_then_repair(self, block: int, at: int) -> None:
        """A flipped bit on disk is reported for exactly that block, then repaired by copy."""
        if not self.mapped[block]:
            return
        pos = block * BLOCK_SIZE + at
        with open(self.replica.paths.data, "r+b") as f:
            f.seek(pos)
            old = f.read(1)
            f.seek(pos)
            f.write(bytes([old[0] ^ 0x10]))
        with pytest.raises(ChecksumMismatch) as info:
            self.run(self.replica.read(0, EXTENT))
        assert info.value.blocks == [block]
        good = bytes(self.data[block * BLOCK_SIZE : (block + 1) * BLOCK_SIZE])
        self.run(self.replica.apply_copy(block * BLOCK_SIZE, good, block_checksum(good)))
        self.dirty = True  # the repair wrote the file: a kill now leaves it unclean

    @rule()
    def flush(self) -> None:
        self.run(self.replica.flush())
        assert self.replica.durable_seq == self.seq

    @rule(clean=st.booleans())
    def restart(self, clean: bool) -> None:
        if clean:
            self.run(self.store.close())
        else:
            self.replica.abandon()  # a killed process: no flush, no clean close
        self.store = ExtentStore([self.dir], EXTENT, boot_id=BOOT)
        [info] = self.store.list_replicas().replicas
        assert info.applied_seq == self.seq
        self.dirty = self.dirty and not clean
        assert info.unclean == self.dirty
        self.replica = self.run(self.store.open("model", 0))

    @precondition(lambda self: self.seq > 0)
    @invariant()
    def checksums_describe_the_model(self) -> None:
        sums = self.run(self.replica.checksums())
        for b in range(BLOCKS):
            entry = sums[b * 8 : b * 8 + 8]
            block = bytes(self.data[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE])
            assert (entry != UNMAPPED) == self.mapped[b]
            if self.mapped[b]:
                assert entry == block_checksum(block)
        assert self.replica.mapped_blocks == sum(self.mapped)
        assert self.replica.applied_seq == self.seq


ExtentModel.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestExtentModel = ExtentModel.TestCase
