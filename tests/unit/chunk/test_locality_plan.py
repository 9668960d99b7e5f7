"""Locality, the pure part (lunastor/chunk/maintenance/locality_plan.py): when an access point
claims an extent, what the primary does about a claim, and how that meets the repair plan and
meta's rebalancing (which respects claims). Table-driven."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from lunastor.chunk.maintenance.locality_plan import (
    ClaimPolicy,
    decide_claim,
    locality_action,
    retiree,
)
from lunastor.chunk.maintenance.repair_plan import ActionKind, ServerView, plan, plan_extent
from lunastor.common.records import ExtentRecord, LocalityClaim
from lunastor.meta.rebalance_plan import Holder, plan_moves

POLICY = ClaimPolicy(min_iops=10, hold=30.0, max_hold=240.0, settle=10.0)


def claim(chunk: str, since: float, hold: float = 30.0, contests: int = 0) -> LocalityClaim:
    return LocalityClaim("v", 0, chunk, since, hold, contests)


@dataclass
class ClaimCase:
    name: str
    iops: float
    primary: str
    existing: LocalityClaim | None
    now: float
    want: tuple[str, float, float, int] | None  # (chunk, since, hold, contests)


CLAIMS = [
    ClaimCase("too little IO", 9.5, "p", None, 100.0, None),
    ClaimCase("we are the primary already", 1000, "me", None, 100.0, None),
    ClaimCase("no claim yet: claim with the base hold", 10, "p", None, 100.0, ("me", 100, 30, 0)),
    ClaimCase("ours already", 500, "p", claim("me", 0.0), 100.0, None),
    ClaimCase("another's, within its hold", 500, "p", claim("x", 80.0), 100.0, None),
    ClaimCase(
        "another's, hold run out: taken over, hold doubled",
        500,
        "p",
        claim("x", 60.0),
        100.0,
        ("me", 100, 60, 1),
    ),
    ClaimCase(
        "contested again: doubled up to max_hold",
        500,
        "x",
        claim("x", 0.0, hold=200.0, contests=3),
        300.0,
        ("me", 300, 240, 4),
    ),
    ClaimCase(
        "an old settled claim: taken over at the base hold",
        500,
        "x",
        claim("x", 0.0, hold=30.0, contests=2),
        300.0,
        ("me", 300, 30, 0),
    ),
]


@pytest.mark.parametrize("case", CLAIMS, ids=lambda c: c.name)
def test_decide_claim(case: ClaimCase) -> None:
    got = decide_claim("me", case.now, case.iops, case.primary, case.existing, "v", 0, POLICY)
    if case.want is None:
        assert got is None
    else:
        assert got is not None
        assert (got.chunk, got.since, got.hold, got.contests) == case.want
        assert (got.volume, got.index) == ("v", 0)


def test_two_access_points_writing_one_extent_move_it_less_and_less_often() -> None:
    # both write the extent all the time; each claims whenever the rules let it
    existing: LocalityClaim | None = None
    primary = "p"
    moves: list[float] = []
    for t in range(0, 3600, 5):  # a claim pass every 5 s, an hour long
        for ap in ("a", "b"):
            new = decide_claim(ap, float(t), 1000, primary, existing, "v", 0, POLICY)
            if new is not None:
                existing, primary = new, ap  # the primary follows at once (worst case)
                moves.append(float(t))
    gaps = [b - a for a, b in itertools.pairwise(moves)]
    assert len(moves) <= 20  # not every 5 s: ~720 passes
    assert gaps == sorted(gaps)  # each move waits at least as long as the one before
    assert gaps[-1] >= POLICY.max_hold


def test_policy_bounds() -> None:
    for bad in ({"min_iops": 0}, {"hold": 0.0}, {"hold": 10.0, "max_hold": 5.0}, {"settle": 0.5}):
        with pytest.raises(ValueError):
            ClaimPolicy(**bad)  # type: ignore[arg-type]


def up(cid: str, zone: str = "z1", draining: bool = False) -> ServerView:
    return ServerView(cid, zone, live=True, draining=draining)


SERVERS = {s.id: s for s in [up("a", "z1"), up("b", "z2"), up("c", "z3"), up("d", "z1")]}


@dataclass
class ActCase:
    name: str
    replicas: list[str]
    claimant: str
    want: tuple[ActionKind, str] | None  # (kind, member); the actor is always the primary
    desired: int = 3
    servers: dict[str, ServerView] | None = None
    zones: tuple[str, ...] = ()


ACTIONS = [
    ActCase("the claimant is the primary", ["a", "b", "c"], "a", None),
    ActCase(
        "a secondary claims: hand over", ["a", "b", "c"], "c", (ActionKind.LOCALITY_HANDOVER, "c")
    ),
    ActCase("a non-member claims: it joins", ["a", "b", "c"], "d", (ActionKind.LOCALITY_ADD, "d")),
    ActCase(
        "it joined: a secondary in a zone another member covers goes",
        ["a", "b", "c", "d"],
        "d",
        (ActionKind.LOCALITY_RETIRE, "c"),
        servers={**SERVERS, "c": up("c", "z1")},
    ),
    ActCase(
        "it joined: the last secondary goes when every zone is single",
        ["a", "b", "c", "d"],
        "d",
        (ActionKind.LOCALITY_RETIRE, "c"),
    ),
    ActCase(
        "1 replica: it joined, the primary retires (handing over to it)",
        ["a", "d"],
        "d",
        (ActionKind.LOCALITY_RETIRE, "a"),
        desired=1,
    ),
    ActCase("an unknown claimant", ["a", "b", "c"], "zz", None),
    ActCase(
        "a draining claimant",
        ["a", "b", "c"],
        "d",
        None,
        servers={**SERVERS, "d": up("d", "z1", draining=True)},
    ),
    ActCase(
        "a claimant that is down",
        ["a", "b", "c"],
        "d",
        None,
        servers={**SERVERS, "d": ServerView("d", "z1", live=False, down_for=5)},
    ),
    ActCase(
        "a claimant still starting (live, its data port not up yet)",
        ["a", "b", "c"],
        "d",
        None,
        servers={**SERVERS, "d": ServerView("d", "z1", expected=True)},
    ),
    ActCase("a claimant outside the volume's zones", ["a", "b"], "d", None, 2, zones=("z2", "z3")),
]


@pytest.mark.parametrize("case", ACTIONS, ids=lambda c: c.name)
def test_locality_action(case: ActCase) -> None:
    rec = ExtentRecord(volume="v", index=0, gen=4, replicas=case.replicas)
    servers = case.servers or SERVERS
    got = locality_action(rec, servers, case.desired, case.claimant, allowed_zones=case.zones)
    if case.want is None:
        assert got is None
    else:
        assert got is not None
        assert (got.kind, got.member, got.actor) == (*case.want, case.replicas[0])


def test_the_retiree_is_never_the_claimant() -> None:
    for keep in ("a", "b", "c", "d"):
        rec = ExtentRecord(volume="v", index=0, replicas=["a", "b", "c", "d"])
        assert retiree(rec, SERVERS, keep) != keep


def test_repairs_and_rebalancing_moves_come_before_a_claim() -> None:
    rec = ExtentRecord(volume="v", index=0, gen=2, replicas=["a", "b", "c"])
    servers = {**SERVERS, "b": ServerView("b", "z2", live=False, down_for=1000)}
    act = plan_extent(rec, servers, 3, replace_after=60, claim="d")
    assert act is not None and act.kind is ActionKind.REMOVE_DEAD
    act = plan_extent(rec, SERVERS, 3, replace_after=60, move=("c", "d"), claim="b")
    assert act is not None and act.kind is ActionKind.REBALANCE_ADD
    act = plan_extent(rec, SERVERS, 3, replace_after=60, claim="b")
    assert act is not None and act.kind is ActionKind.LOCALITY_HANDOVER


def test_a_claim_the_planner_cannot_handle_does_not_stop_the_pass() -> None:
    good = ExtentRecord(volume="v", index=1, gen=2, replicas=["a", "d", "c"])
    odd = ExtentRecord(volume="v", index=2, gen=2, replicas=["a", "d", "c"])
    dead = ExtentRecord(volume="v", index=3, gen=2, replicas=["b", "a", "c"])
    servers = {**SERVERS, "b": ServerView("b", "z2", live=False, down_for=1000)}
    claims = {("v", 1): "c", ("v", 2): ["x"], ("v", 3): "c"}  # a broken (unhashable) claimant
    acts = plan([good, odd, dead], servers, {"v": 3}, replace_after=60, claims=claims)  # type: ignore[arg-type]
    kinds = {(a.index, a.kind) for a in acts}
    assert (3, ActionKind.FAILOVER) in kinds  # repairs go on whatever the claims say
    assert (1, ActionKind.LOCALITY_HANDOVER) in kinds
    assert not any(a.index == 2 for a in acts)  # the broken claim is skipped


def test_rebalancing_never_moves_the_claimants_replica_away() -> None:
    # s0 is overloaded; every extent on it is claimed by s0 except the odd ones
    servers = [Holder(f"s{i}", "z", 1000) for i in range(4)]
    recs = [ExtentRecord(volume="v", index=i, replicas=["s0", "s1", "s2"]) for i in range(40)]
    claims = {("v", i): "s0" for i in range(0, 40, 2)}
    plan_ = plan_moves(recs, servers, max_moves=100, max_per_server=100, claims=claims)
    assert plan_.moves
    assert all(
        not (m.source == "s0" and claims.get((m.volume, m.index)) == "s0") for m in plan_.moves
    )
    assert any(m.source == "s0" for m in plan_.moves)  # unclaimed ones still move
    # without claims the planner would move claimed ones too
    free = plan_moves(recs, servers, max_moves=100, max_per_server=100)
    assert any(m.source == "s0" and (m.volume, m.index) in claims for m in free.moves)
