"""Extent placement within a volume's CSI zones (lunastor/common/zoning.py), and the volume
condition computed from its extent map (lunastor/meta/condition.py)."""

from __future__ import annotations

from lunastor.common.records import ExtentRecord
from lunastor.common.zoning import restrict_to_zones
from lunastor.meta.condition import volume_condition

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


def ext(replicas: list[str], copies: int = 0, converging: bool = False) -> ExtentRecord:
    return ExtentRecord(volume="v", replicas=replicas, copies=copies, converging=converging)


def test_condition() -> None:
    live = {"a", "b", "c"}
    assert volume_condition([], live, 3)["abnormal"] is False
    healthy = volume_condition([ext(["a", "b", "c"]), ext(["b", "c", "a"])], live, 3)
    assert healthy["abnormal"] is False and healthy["extents"] == 2
    under = volume_condition([ext(["a", "b", "d"]), ext(["a", "b", "c"])], live, 3)
    assert under["abnormal"] and under["under_replicated_extents"] == 1
    assert "under-replicated: 1 of 2" in under["message"]
    gone = volume_condition([ext(["d", "e"])], live, 2)
    assert gone["unavailable_extents"] == 1 and "unavailable" in gone["message"]
    rebuilding = volume_condition([ext(["a", "b", "c"], converging=True)], live, 3)
    assert rebuilding["rebuilding_extents"] == 1 and "rebuilding" in rebuilding["message"]
    # a volume made with fewer copies than it now keeps is judged by the copies it was made with
    assert volume_condition([ext(["a"], copies=1)], live, 3)["abnormal"] is False
