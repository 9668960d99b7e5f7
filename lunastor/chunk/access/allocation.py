"""Which blocks of an extent are mapped, as runs: what GET LBA STATUS answers from
(docs/datapath.md, "GET LBA STATUS").

`AllocationMap` is built once from a replica's checksum array (8 bytes per 4 KiB block, 0 =
unmapped) and then answers "the run containing block b" with a binary search, so a query
costs the same whatever the extent's size. `AllocationMaps` keeps one per extent, stamped
with what it was built from (the replica object, its generation and its `applied_seq`): a
mutation of the replica moves `applied_seq`, so a stamp that still matches means the map is
exact. Built from the local replica when this chunk server may serve reads of it, else from
the primary's array, re-validated by a state request without the array.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Hashable
from dataclasses import dataclass

from lunastor.chunk.store import CHECKSUM_SIZE

_NONZERO = bytes([0] + [1] * 255)


@dataclass(frozen=True, slots=True)
class AllocationMap:
    """Runs of one extent's blocks: block 0 is mapped iff `first`; the state flips at each of
    `edges` (ascending, each in 1..nblocks-1)."""

    nblocks: int
    first: bool
    edges: tuple[int, ...]

    @classmethod
    def from_checksums(cls, sums: bytes | bytearray | memoryview) -> AllocationMap:
        view = memoryview(sums)
        if len(view) % CHECKSUM_SIZE:
            raise ValueError(f"a checksum array is whole {CHECKSUM_SIZE}-byte entries")
        nblocks = len(view) // CHECKSUM_SIZE
        if nblocks == 0:
            return cls(0, False, ())
        # Every scan runs in C: `array.index` finds the next unmapped entry, and `find` in a
        # copy with every nonzero byte made 1 finds the next mapped one; Python runs once per
        # run, not per block.
        entries = array("Q")
        entries.frombytes(view.cast("B"))
        ones = bytes(view.cast("B")).translate(_NONZERO)
        state = entries[0] != 0
        edges: list[int] = []
        pos = 0
        while True:
            if state:
                try:
                    pos = entries.index(0, pos)
                except ValueError:
                    break
            else:
                found = ones.find(1, pos * CHECKSUM_SIZE)
                if found < 0:
                    break
                pos = found // CHECKSUM_SIZE
            edges.append(pos)
            state = not state
        first = entries[0] != 0
        return cls(nblocks, first, tuple(edges))

    @classmethod
    def unmapped(cls, nblocks: int) -> AllocationMap:
        return cls(nblocks, False, ())

    def run_at(self, block: int) -> tuple[bool, int]:
        """(mapped, end): the state of `block` and the first block after its run."""
        if not 0 <= block < self.nblocks:
            raise ValueError(f"block {block} is not in 0..{self.nblocks - 1}")
        i = bisect_right(self.edges, block)
        end = self.edges[i] if i < len(self.edges) else self.nblocks
        return self.first != (i % 2 == 1), end

    @property
    def mapped_blocks(self) -> int:
        bounds = (0, *self.edges, self.nblocks)
        start = 0 if self.first else 1
        return sum(bounds[i + 1] - bounds[i] for i in range(start, len(bounds) - 1, 2))


class AllocationMaps:
    """The last map built per extent, with the stamp it was built at."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._maps: dict[tuple[str, int], tuple[Hashable, AllocationMap]] = {}
        self.builds = 0  # maps built (a test and the bench read it)

    def get(self, volume: str, index: int, stamp: Hashable) -> AllocationMap | None:
        found = self._maps.get((volume, index))
        if found is None or found[0] != stamp:
            return None
        return found[1]

    def put(
        self, volume: str, index: int, stamp: Hashable, sums: bytes | bytearray | memoryview
    ) -> AllocationMap:
        amap = AllocationMap.from_checksums(sums)
        self.builds += 1
        if len(self._maps) >= self.limit:
            self._maps.pop(next(iter(self._maps)))
        self._maps[(volume, index)] = (stamp, amap)
        return amap
