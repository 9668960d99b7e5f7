"""The bootstrap ring is a valid placement ring; look-ups by (volume, index) agree with extent
keys; IO splits at extent edges."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lunastor.chunk.access.volume import split
from lunastor.chunk.replication.ring import RingError, Server, bootstrap_ring
from lunastor.common.ring import InvalidRing, Ring, place_replicas
from lunastor.meta.placement import Candidate, build_ring

SERVERS = [
    Server("chunk-a", "z1", 100, 50),
    Server("chunk-b", "z2", 100, 50),
    Server("chunk-c", "z3", 100, 50),
    Server("chunk-d", "z1", 0, 0),  # an empty disk report: still usable in a bootstrap ring
]


def test_bootstrap_ring_is_a_valid_placement_ring_with_one_replica_per_zone() -> None:
    ring = bootstrap_ring(SERVERS, 3, part_power=6)
    assert Ring.from_dict(ring.to_dict()) == ring  # full validation: distinct servers, all up
    for vol in ("vol-1", "vol-0123456789abcdef"):
        for index in range(40):
            placed = ring.place(vol, index)
            assert placed == place_replicas(f"{vol}/{index}", ring)
            zones = {next(s.zone for s in SERVERS if s.id == c) for c in placed}
            assert len(zones) == 3


def test_bootstrap_ring_is_deterministic_and_needs_enough_servers() -> None:
    assert bootstrap_ring(SERVERS, 3) == bootstrap_ring(list(reversed(SERVERS)), 3)
    with pytest.raises(RingError):
        bootstrap_ring(SERVERS[:2], 3)


def test_place_by_volume_and_index_is_place_replicas_of_the_extent_key() -> None:
    cands = [Candidate(s.id, s.zone, 1000, 500, "up") for s in SERVERS]
    ring = Ring.from_dict(build_ring(cands, 3, 8).to_dict())
    for index in range(300):
        assert ring.place("vol-x", index) == place_replicas(f"vol-x/{index}", ring)


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"format": 2},
        {"format": 1, "replicas": 1, "part_power": 1, "candidates": [], "table": []},
    ],
)
def test_bad_stored_rings_are_typed_errors(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidRing):
        Ring.from_dict(bad)


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (0, 10, [(0, 0, 10, 0)]),
        (90, 20, [(0, 90, 10, 0), (1, 0, 10, 10)]),
        (100, 250, [(1, 0, 100, 0), (2, 0, 100, 100), (3, 0, 50, 200)]),
    ],
)
def test_split_table(offset: int, length: int, expected: list[tuple[int, int, int, int]]) -> None:
    got = [(p.extent, p.offset, p.length, p.start) for p in split(offset, length, 100)]
    assert got == expected


@given(st.integers(0, 10_000), st.integers(1, 5_000), st.integers(1, 700))
def test_split_covers_the_range_once_within_extents(offset: int, length: int, size: int) -> None:
    pieces = split(offset, length, size)
    assert sum(p.length for p in pieces) == length
    pos = 0
    for p in pieces:
        assert p.start == pos and p.offset >= 0 and p.offset + p.length <= size
        assert p.extent * size + p.offset == offset + pos
        pos += p.length
