"""`AllocationMap` (GET LBA STATUS's runs), table-driven and against a per-block model."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lunastor.chunk.access.allocation import AllocationMap, AllocationMaps


def sums(pattern: str) -> bytes:
    """One 8-byte entry per character: '#' mapped, '.' unmapped."""
    return b"".join((7).to_bytes(8, "big") if c == "#" else bytes(8) for c in pattern)


CASES = [
    # pattern, first, edges
    ("", False, ()),
    (".", False, ()),
    ("#", True, ()),
    ("....", False, ()),
    ("####", True, ()),
    ("##..", True, (2,)),
    ("..##", False, (2,)),
    ("#.#.", True, (1, 2, 3)),
    (".##.#", False, (1, 3, 4)),
]


@pytest.mark.parametrize(("pattern", "first", "edges"), CASES)
def test_runs_from_a_checksum_array(pattern: str, first: bool, edges: tuple[int, ...]) -> None:
    amap = AllocationMap.from_checksums(sums(pattern))
    assert (amap.nblocks, amap.first, amap.edges) == (len(pattern), first, edges)
    assert amap.mapped_blocks == pattern.count("#")


RUN_AT = [
    # pattern, block, (mapped, end)
    ("##..", 0, (True, 2)),
    ("##..", 1, (True, 2)),
    ("##..", 2, (False, 4)),
    ("##..", 3, (False, 4)),
    ("#.#.", 2, (True, 3)),
    (".##.#", 4, (True, 5)),
    ("....", 1, (False, 4)),
]


@pytest.mark.parametrize(("pattern", "block", "want"), RUN_AT)
def test_the_run_at_a_block(pattern: str, block: int, want: tuple[bool, int]) -> None:
    assert AllocationMap.from_checksums(sums(pattern)).run_at(block) == want


@given(st.text(alphabet="#.", max_size=300), st.data())
def test_run_at_agrees_with_the_blocks(pattern: str, data: st.DataObject) -> None:
    amap = AllocationMap.from_checksums(sums(pattern))
    if not pattern:
        return
    block = data.draw(st.integers(0, len(pattern) - 1))
    mapped, end = amap.run_at(block)
    assert mapped == (pattern[block] == "#")
    assert set(pattern[block:end]) == {pattern[block]}
    assert end == len(pattern) or pattern[end] != pattern[block]


@pytest.mark.parametrize("bad", [-1, 4])
def test_a_block_outside_the_extent_is_an_error(bad: int) -> None:
    with pytest.raises(ValueError, match=r"not in 0\.\.3"):
        AllocationMap.from_checksums(sums("##..")).run_at(bad)


def test_a_torn_checksum_array_is_an_error() -> None:
    with pytest.raises(ValueError, match="whole 8-byte entries"):
        AllocationMap.from_checksums(bytes(12))


def test_a_lookup_costs_the_same_whatever_the_extent_size() -> None:
    # 64 MiB of alternating runs of 16 blocks against 1 MiB of the same: a lookup is a
    # binary search, so the large map answers within a small factor of the small one
    small = AllocationMap.from_checksums(sums(("#" * 16 + "." * 16) * 8))
    large = AllocationMap.from_checksums(sums(("#" * 16 + "." * 16) * 512))

    def per_lookup(amap: AllocationMap) -> float:
        start = time.perf_counter()
        for i in range(20000):
            amap.run_at(i % amap.nblocks)
        return (time.perf_counter() - start) / 20000

    assert per_lookup(large) < 4 * per_lookup(small) + 2e-6


def test_the_cache_answers_only_for_the_stamp_it_was_built_at() -> None:
    maps = AllocationMaps(limit=2)
    built = maps.put("v", 0, ("r", 1, 5), sums("#."))
    assert maps.get("v", 0, ("r", 1, 5)) is built
    assert maps.get("v", 0, ("r", 1, 6)) is None  # a write moved applied_seq
    assert maps.get("v", 0, ("r", 2, 5)) is None  # another generation
    maps.put("v", 1, 1, sums("#"))
    maps.put("v", 2, 1, sums("#"))  # over the limit: the oldest goes
    assert maps.get("v", 0, ("r", 1, 5)) is None
    assert maps.builds == 3
