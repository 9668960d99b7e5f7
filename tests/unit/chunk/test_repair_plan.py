"""The repair planner (lunastor/chunk/maintenance/repair_plan.py): one action per extent,
table-driven."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lunastor.chunk.maintenance.repair_plan import (
    Action,
    ActionKind,
    ServerView,
    choose_target,
    plan,
    plan_extent,
)
from lunastor.common.records import ExtentRecord

REPLACE_AFTER = 60.0


def up(cid: str, zone: str = "z1", draining: bool = False) -> ServerView:
    return ServerView(cid, zone, live=True, draining=draining)


def down(cid: str, zone: str = "z1", down_for: float = 1000.0) -> ServerView:
    return ServerView(cid, zone, live=False, down_for=down_for)


def away(cid: str, zone: str = "z1", down_for: float = 1000.0) -> ServerView:
    """Down on purpose and expected back (a planned restart: maintenance/restart.py)."""
    return ServerView(cid, zone, live=False, down_for=down_for, expected=True)


@dataclass
class Case:
    name: str
    replicas: list[str]
    servers: list[ServerView]
    want: tuple[ActionKind, str, str] | None  # (kind, actor, member)
    desired: int = 3
    converging: bool = False
    placement: list[str] = field(default_factory=list)
    holders: list[str] = field(default_factory=list)
    move: tuple[str, str] | None = None  # a rebalancing move (source, target) from meta
    zones: list[str] = field(default_factory=list)  # the volume's CSI topology (VolumeRecord)
    min_replicas: int = 1


THREE_ZONES = [up("a", "z1"), up("b", "z2"), up("c", "z3")]

CASES = [
    Case("healthy", ["a", "b", "c"], THREE_ZONES, None),
    Case(
        "dead primary: the first live member fails over",
        ["a", "b", "c"],
        [down("a"), up("b", "z2"), up("c", "z3")],
        (ActionKind.FAILOVER, "b", ""),
    ),
    Case(
        "converging: the first live member redoes the convergence",
        ["a", "b", "c"],
        [down("a"), down("b"), up("c", "z3")],
        (ActionKind.FAILOVER, "c", ""),
        converging=True,
    ),
    Case(
        "converging with a live primary: the primary converges",
        ["a", "b"],
        THREE_ZONES,
        (ActionKind.FAILOVER, "a", ""),
        converging=True,
    ),
    Case("no live member: nobody can act", ["a", "b"], [down("a"), down("b"), up("c")], None),
    Case(
        "primary away on purpose: waited for, not failed over",
        ["a", "b", "c"],
        [away("a"), up("b", "z2"), up("c", "z3")],
        (ActionKind.WAIT, "b", "a"),
    ),
    Case(
        "primary starting (live, not serving yet): waited for",
        ["a", "b", "c"],
        [ServerView("a", "z1", expected=True), up("b", "z2"), up("c", "z3")],
        (ActionKind.WAIT, "a", "a"),
    ),
    Case(
        "converging with the primary away: the convergence is redone all the same",
        ["a", "b", "c"],
        [away("a"), up("b", "z2"), up("c", "z3")],
        (ActionKind.FAILOVER, "b", ""),
        converging=True,
    ),
    Case(
        "secondary away on purpose past replace_after: waited for, not removed",
        ["a", "b", "c"],
        [up("a"), away("b", down_for=61), up("c"), up("d")],
        (ActionKind.WAIT, "a", "b"),
    ),
    Case(
        "a secondary starting (live, not serving yet): no replica added meanwhile",
        ["a", "b"],
        [up("a"), ServerView("b", "z1", expected=True), up("c")],
        (ActionKind.WAIT, "a", "b"),
    ),
    Case(
        "a removed member back and starting (live, not serving yet): waited for, not copied "
        "around (it holds the old replica file, but cannot say so yet)",
        ["a", "b"],
        [up("a"), up("b"), ServerView("c", "z1", expected=True), up("d")],
        (ActionKind.WAIT, "a", "c"),
    ),
    Case(
        "below min_replicas, a starting server is not the target: its data port may not serve",
        ["a"],
        [up("a"), ServerView("b", "z1", expected=True), up("c")],
        (ActionKind.ADD, "a", "c"),
        placement=["b", "c"],
        min_replicas=2,
    ),
    Case(
        "a server away on purpose while replicas are missing: no replica added meanwhile",
        ["a", "b"],
        [up("a"), up("b"), away("c", down_for=61), up("d")],
        (ActionKind.WAIT, "a", "c"),
    ),
    Case(
        "a lone member below min_replicas: a server down briefly is not waited for",
        ["c"],
        [down("a", down_for=5), up("b"), up("c")],
        (ActionKind.ADD, "c", "b"),
        min_replicas=2,
    ),
    Case(
        "below min_replicas, a server away on purpose is not waited for either",
        ["c"],
        [away("a", down_for=5), up("b"), up("c")],
        (ActionKind.ADD, "c", "b"),
        min_replicas=2,
    ),
    Case(
        "at min_replicas, a server down briefly is waited for",
        ["b", "c"],
        [down("a", down_for=5), up("b"), up("c"), up("d")],
        (ActionKind.WAIT, "b", "a"),
        min_replicas=2,
    ),
    Case(
        "min_replicas 1: a lone member still acknowledges, a server down briefly is waited for",
        ["c"],
        [down("a", down_for=5), up("b"), up("c")],
        (ActionKind.WAIT, "c", "a"),
        desired=2,
        min_replicas=1,
    ),
    Case(
        "secondary down for long: removed by the primary",
        ["a", "b", "c"],
        [up("a"), down("b", down_for=61), up("c"), up("d")],
        (ActionKind.REMOVE_DEAD, "a", "b"),
    ),
    Case(
        "secondary never registered: removed",
        ["a", "ghost"],
        [up("a"), up("c")],
        (ActionKind.REMOVE_DEAD, "a", "ghost"),
        desired=2,
    ),
    Case(
        "secondary down briefly: wait for it",
        ["a", "b", "c"],
        [up("a"), down("b", down_for=5), up("c"), up("d")],
        (ActionKind.WAIT, "a", "b"),
    ),
    Case(
        "a member already removed, its server down briefly: wait (catch-up beats a copy)",
        ["a", "c"],
        [up("a"), down("b", down_for=5), up("c"), up("d")],
        (ActionKind.WAIT, "a", "b"),
    ),
    Case(
        "under-replicated after replace_after: add on the spare server",
        ["a", "c"],
        [up("a", "z1"), down("b", "z2"), up("c", "z3"), up("d", "z2")],
        (ActionKind.ADD, "a", "d"),
    ),
    Case(
        "zone spread: the zone the extent lacks wins over ring order",
        ["a", "b"],
        [up("a", "z1"), up("b", "z2"), up("c", "z1"), up("d", "z3")],
        (ActionKind.ADD, "a", "d"),
        placement=["a", "b", "c"],
    ),
    Case(
        "ring order among equal zones",
        ["a", "b"],
        [up("a", "z1"), up("b", "z2"), up("c", "z3"), up("d", "z3")],
        (ActionKind.ADD, "a", "c"),
        placement=["a", "b", "c", "d"],
    ),
    Case(
        "ring order, the other way round",
        ["a", "b"],
        [up("a", "z1"), up("b", "z2"), up("c", "z3"), up("d", "z3")],
        (ActionKind.ADD, "a", "d"),
        placement=["b", "d", "a", "c"],
    ),
    Case(
        "catch-up: a server with an old replica file wins over placement",
        ["a", "b"],
        [up("a", "z1"), up("b", "z2"), up("c", "z3"), up("d", "z3")],
        (ActionKind.ADD, "a", "d"),
        placement=["a", "b", "c", "d"],
        holders=["d"],
    ),
    Case(
        "no candidate: every live server is a member",
        ["a", "b"],
        [up("a"), up("b"), down("c")],
        (ActionKind.NO_CANDIDATE, "a", ""),
    ),
    Case(
        "draining servers are no candidates",
        ["a", "b"],
        [up("a"), up("b"), up("c", draining=True)],
        (ActionKind.NO_CANDIDATE, "a", ""),
    ),
    Case(
        "draining member: its replacement joins first",
        ["a", "b", "c"],
        [up("a", "z1"), up("b", "z2"), up("c", "z3", draining=True), up("d", "z3")],
        (ActionKind.ADD, "a", "d"),
    ),
    Case(
        "draining member, replacement joined: retire it",
        ["a", "b", "c", "d"],
        [up("a"), up("b"), up("c", draining=True), up("d")],
        (ActionKind.REMOVE_EXTRA, "a", "c"),
    ),
    Case(
        "draining primary, replacement joined: it hands over last",
        ["a", "b", "c", "d"],
        [up("a", draining=True), up("b"), up("c", draining=True), up("d"), up("e")],
        (ActionKind.ADD, "a", "e"),
    ),
    Case(
        "draining secondary retired before the draining primary",
        ["a", "b", "c", "d", "e"],
        [up("a", draining=True), up("b"), up("c", draining=True), up("d"), up("e")],
        (ActionKind.REMOVE_EXTRA, "a", "c"),
    ),
    Case(
        "draining primary alone left to retire",
        ["a", "b", "d", "e"],
        [up("a", draining=True), up("b"), up("d"), up("e")],
        (ActionKind.REMOVE_EXTRA, "a", "a"),
    ),
    Case(
        "draining with no spare server: the drain waits",
        ["a", "b", "c"],
        [up("a"), up("b"), up("c", draining=True)],
        (ActionKind.NO_CANDIDATE, "a", ""),
    ),
    Case(
        "over-replicated (replicas lowered): the last member goes",
        ["a", "b", "c"],
        THREE_ZONES,
        (ActionKind.REMOVE_EXTRA, "a", "c"),
        desired=2,
    ),
    Case("desired 2 on 3 servers: healthy", ["a", "b"], THREE_ZONES, None, desired=2),
    Case(
        "desired 2, a member lost: the third server",
        ["a"],
        [up("a", "z1"), down("b", "z2"), up("c", "z3")],
        (ActionKind.ADD, "a", "c"),
        desired=2,
    ),
    Case(
        "rebalancing move: the primary joins the target",
        ["a", "b", "c"],
        [*THREE_ZONES, up("d", "z2")],
        (ActionKind.REBALANCE_ADD, "a", "d"),
        move=("b", "d"),
    ),
    Case(
        "rebalancing move to a target still starting: it waits",
        ["a", "b", "c"],
        [*THREE_ZONES, ServerView("d", "z2", expected=True)],
        None,
        move=("b", "d"),
    ),
    Case(
        "rebalancing move, target joined: the source retires (not the last member)",
        ["a", "b", "c", "d"],
        [*THREE_ZONES, up("d", "z2")],
        (ActionKind.REBALANCE_RETIRE, "a", "b"),
        move=("b", "d"),
    ),
    Case(
        "rebalancing move off the primary: it hands over once the target joined",
        ["a", "b", "c", "d"],
        [*THREE_ZONES, up("d", "z1")],
        (ActionKind.REBALANCE_RETIRE, "a", "a"),
        move=("a", "d"),
    ),
    Case(
        "rebalancing move to a server that went down: waits (meta withdraws it)",
        ["a", "b", "c"],
        [*THREE_ZONES, down("d", "z2")],
        None,
        move=("b", "d"),
    ),
    Case(
        "rebalancing move done: nothing left",
        ["a", "c", "d"],
        [*THREE_ZONES, up("d", "z2")],
        None,
        move=("b", "d"),
    ),
    Case(
        "zoned volume: the new replica stays in its zones, even off the least used zone",
        ["a", "b"],
        [up("a", "z1"), up("b", "z2"), up("c", "z3"), up("d", "z1")],
        (ActionKind.ADD, "a", "d"),
        zones=["z1", "z2"],
    ),
    Case(
        "zoned volume: no server left in its zones is no-candidate, not another zone",
        ["a", "b"],
        [up("a", "z1"), up("b", "z1"), up("c", "z3")],
        (ActionKind.NO_CANDIDATE, "a", ""),
        zones=["z1"],
    ),
    Case(
        "zoned volume: a catch-up holder outside its zones is not taken",
        ["a", "b"],
        [up("a", "z1"), up("b", "z1"), up("c", "z3"), up("d", "z1")],
        (ActionKind.ADD, "a", "d"),
        holders=["c"],
        zones=["z1"],
    ),
    Case(
        "zoned volume: a rebalancing move out of its zones is not carried out",
        ["a", "b", "c"],
        [up("a", "z1"), up("b", "z1"), up("c", "z1"), up("d", "z2")],
        None,
        move=("b", "d"),
        zones=["z1"],
    ),
    Case(
        "repair comes before a rebalancing move",
        ["a", "b", "c"],
        [up("a"), down("b", "z2"), up("c", "z3"), up("d", "z2")],
        (ActionKind.REMOVE_DEAD, "a", "b"),
        move=("c", "d"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_plan_extent(case: Case) -> None:
    rec = ExtentRecord(
        volume="v", index=3, gen=4, replicas=case.replicas, converging=case.converging
    )
    servers = {s.id: s for s in case.servers}
    got = plan_extent(
        rec,
        servers,
        case.desired,
        replace_after=REPLACE_AFTER,
        placement=case.placement,
        old_holders=case.holders,
        move=case.move,
        allowed_zones=case.zones,
        min_replicas=case.min_replicas,
    )
    if case.want is None:
        assert got is None
        return
    kind, actor, member = case.want
    assert got == Action(kind, "v", 3, actor, member)


def test_plan_skips_deleted_volumes_and_uses_each_volumes_replicas() -> None:
    servers = {s.id: s for s in THREE_ZONES}
    extents = [
        ExtentRecord(volume="two", index=0, replicas=["a", "b", "c"]),
        ExtentRecord(volume="three", index=0, replicas=["a", "b"]),
        ExtentRecord(volume="gone", index=0, replicas=["a"]),
    ]
    got = plan(extents, servers, {"two": 2, "three": 3}, replace_after=1)
    assert got == [
        Action(ActionKind.REMOVE_EXTRA, "two", 0, "a", "c"),
        Action(ActionKind.ADD, "three", 0, "a", "c"),
    ]


def test_plan_keeps_each_volume_and_its_preserved_copies_in_its_zones() -> None:
    servers = {s.id: s for s in [up("a", "z1"), up("b", "z2"), up("c", "z3"), up("d", "z1")]}
    extents = [
        ExtentRecord(volume="zoned", index=0, replicas=["a"]),
        ExtentRecord(volume="zoned.e1", index=0, replicas=["a"]),
        ExtentRecord(volume="free", index=0, replicas=["a"]),
    ]
    got = plan(
        extents,
        servers,
        dict.fromkeys(["zoned", "free"], 2),
        replace_after=1,
        zones={"zoned": ["z1"]},
    )
    by_volume = {a.volume: a.member for a in got}
    assert by_volume["zoned"] == by_volume["zoned.e1"] == "d"  # z1's other server, not b or c
    assert by_volume["free"] in ("b", "c")  # unrestricted: the least used zones


def test_a_snapshots_preserved_copy_is_kept_as_redundant_as_its_volume() -> None:
    servers = {s.id: s for s in THREE_ZONES}
    extents = [
        ExtentRecord(volume="three.e1", index=0, replicas=["a", "b"]),
        ExtentRecord(volume="gone.e2", index=0, replicas=["a"]),
    ]
    got = plan(extents, servers, {"three": 3}, replace_after=1)
    assert got == [Action(ActionKind.ADD, "three.e1", 0, "a", "c")]


ids = st.sampled_from("abcdef")


@given(
    members=st.lists(ids, min_size=1, max_size=5, unique=True),
    live=st.sets(ids),
    draining=st.sets(ids),
    zones=st.dictionaries(ids, st.sampled_from(["z1", "z2", "z3"])),
    desired=st.integers(1, 4),
)
def test_plan_properties(
    members: list[str], live: set[str], draining: set[str], zones: dict[str, str], desired: int
) -> None:
    servers = {
        c: ServerView(c, zones.get(c, "z1"), live=c in live, draining=c in draining, down_for=100)
        for c in "abcdef"
    }
    rec = ExtentRecord(volume="v", index=0, replicas=members)
    act = plan_extent(rec, servers, desired, replace_after=60)
    if act is None:
        return
    # the actor is always a live member; a new replica goes to a live, non-draining outsider
    assert act.actor in members and servers[act.actor].live
    if act.kind is ActionKind.ADD:
        assert act.member not in members
        assert servers[act.member].live and not servers[act.member].draining
        assert act.member == choose_target(rec, servers)
    if act.kind in (ActionKind.REMOVE_DEAD, ActionKind.REMOVE_EXTRA):
        assert act.member in members
    if act.kind is ActionKind.REMOVE_DEAD:
        assert not servers[act.member].live
    if act.kind is ActionKind.REMOVE_EXTRA:
        # never below the wanted count of non-draining members
        keep = [m for m in members if m != act.member and not servers[m].draining]
        assert len(keep) >= desired
