"""The join's diff of two checksum arrays into copy runs (lunastor/chunk/replication/join.py)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lunastor.chunk.replication.join import differing_runs

KIB = 1024


def arr(*entries: int) -> bytes:
    return struct.pack(f"<{len(entries)}Q", *entries)


@pytest.mark.parametrize(
    ("ours", "theirs", "run", "want"),
    [
        (arr(1, 2, 3), arr(1, 2, 3), 1 << 20, []),
        (arr(1, 2, 3), arr(0, 0, 0), 1 << 20, [(0, 12 * KIB)]),  # a new member: everything
        (arr(1, 2, 3), arr(1, 9, 3), 1 << 20, [(4 * KIB, 4 * KIB)]),
        (arr(1, 2, 3, 4), arr(9, 2, 9, 9), 1 << 20, [(0, 4 * KIB), (8 * KIB, 8 * KIB)]),
        (
            arr(1, 2, 3, 4, 5),
            arr(0, 0, 0, 0, 0),
            8 * KIB,
            [(0, 8 * KIB), (8 * KIB, 8 * KIB), (16 * KIB, 4 * KIB)],
        ),
        (arr(0, 0), arr(7, 0), 1 << 20, [(0, 4 * KIB)]),  # unmapped on the primary: copied too
        (arr(1, 2), b"", 1 << 20, [(0, 8 * KIB)]),  # a short array counts as unmapped
    ],
)
def test_differing_runs(ours: bytes, theirs: bytes, run: int, want: list[tuple[int, int]]) -> None:
    assert differing_runs(ours, theirs, run) == want


@given(
    pairs=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), max_size=64),
    per=st.integers(1, 8),
)
def test_runs_cover_exactly_the_differing_blocks(pairs: list[tuple[int, int]], per: int) -> None:
    ours = arr(*(a for a, _ in pairs))
    theirs = arr(*(b for _, b in pairs))
    runs = differing_runs(ours, theirs, per * 4 * KIB)
    covered = [blk for off, n in runs for blk in range(off // (4 * KIB), (off + n) // (4 * KIB))]
    assert covered == [i for i, (a, b) in enumerate(pairs) if a != b]
    assert all(0 < n <= per * 4 * KIB for _, n in runs)
