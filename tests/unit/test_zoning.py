"""Extent placement within a volume's CSI zones (lunastor/common/zoning.py)."""

from __future__ import annotations

from lunastor.common.zoning import restrict_to_zones

ZONE_OF = {"c1": "z1", "c2": "z2", "c3": "z3", "c4": "z1", "c5": "z2"}


def test_no_zones_keeps_the_ring() -> None:
    assert restrict_to_zones(["c2", "c1", "c3"], ZONE_OF, [], 3, "v", 0) == ["c2", "c1", "c3"]


def test_ring_choices_in_the_zones_come_first_in_ring_order() -> None:
    got = restrict_to_zones(["c2", "c1", "c3"], ZONE_OF, ["z1", "z2"], 2, "v", 0)
    assert got == ["c2", "c1"]


def test_filled_up_from_the_zones_servers_deterministically() -> None:
    got = restrict_to_zones(["c2", "c3"], ZONE_OF, ["z1"], 2, "v", 7)
    assert sorted(got) == ["c1", "c4"]
    assert got == restrict_to_zones(["c2", "c3"], ZONE_OF, ["z1"], 2, "v", 7)
    spread = {tuple(restrict_to_zones(["c3"], ZONE_OF, ["z1", "z2"], 1, "v", i)) for i in range(40)}
    assert len(spread) > 1  # extents spread over the zone's servers
    assert restrict_to_zones(["c1"], ZONE_OF, ["mars"], 2, "v", 0) == []
