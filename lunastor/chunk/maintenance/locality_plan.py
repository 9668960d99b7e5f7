"""Locality, the pure part (docs/datapath.md, "Locality"): when an access point claims an
extent, and what the extent's primary does about a claim. No IO and no clock here
(`locality.py` measures, writes claims and carries the actions out).

An access point that keeps doing IO on an extent whose primary is elsewhere **claims** it
(`decide_claim`). Hysteresis: a claim held by another access point is taken over only after
its `hold` has run; a takeover of a recent claim doubles `hold` (up to `max_hold`), so two
access points writing one extent (multipath, a pod moving) move its primary less and less
often; a claim that stood undisturbed for `settle` holds is history, and a takeover starts
again from the base hold.

The extent's primary acts on a claim in its repair pass (`locality_action`, called by
`repair_plan.plan_extent` after every repair and rebalancing action): the claimant joins if
it is not a member; with one member too many, another member is retired (a secondary in a
zone another member also covers, else the last); then, the claimant being a member, the
primary hands over to it at a clean point (locality.py `hand_over`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lunastor.common.records import LocalityClaim

if TYPE_CHECKING:
    from lunastor.chunk.maintenance.repair_plan import Action, ServerView
    from lunastor.common.records import ExtentRecord


@dataclass(frozen=True, slots=True)
class ClaimPolicy:
    min_iops: float = 20.0  # IO rate through this access point over a window to claim
    hold: float = 30.0  # seconds a fresh claim holds against other access points
    max_hold: float = 3600.0
    settle: float = 10.0  # a claim undisturbed for settle x hold is history

    def __post_init__(self) -> None:
        if not self.min_iops > 0:
            raise ValueError("min_iops: expected > 0")
        if not 0 < self.hold <= self.max_hold:
            raise ValueError("hold: expected 0 < hold <= max_hold")
        if self.settle < 1:
            raise ValueError("settle: expected >= 1")


def decide_claim(
    me: str,
    now: float,
    iops: float,
    primary: str,
    existing: LocalityClaim | None,
    volume: str,
    index: int,
    policy: ClaimPolicy,
) -> LocalityClaim | None:
    """The claim this access point writes for an extent it did `iops` IOs a second on over
    the last window, or None (nothing to write)."""
    if iops < policy.min_iops or primary == me:
        return None
    if existing is None:
        return LocalityClaim(volume, index, me, now, policy.hold, 0)
    if existing.chunk == me:
        return None  # ours already: the primary is on it
    age = now - existing.since
    if age < existing.hold:
        return None  # hysteresis: the other access point keeps it for now
    if age >= policy.settle * existing.hold:
        return LocalityClaim(volume, index, me, now, policy.hold, 0)
    hold = min(existing.hold * 2, policy.max_hold)
    return LocalityClaim(volume, index, me, now, hold, existing.contests + 1)


def retiree(rec: ExtentRecord, servers: Mapping[str, ServerView], keep: str) -> str:
    """The member to retire when the claimant `keep` joined and one member is too many:
    a secondary before the primary, one whose zone another member also covers, the last."""
    members = rec.replicas

    def zone(m: str) -> str:
        view = servers.get(m)
        return view.zone if view is not None else ""

    def key(m: str) -> tuple[bool, bool, int]:
        others = {zone(x) for x in members if x != m}
        return (m == rec.primary, zone(m) not in others, -members.index(m))

    return min((m for m in members if m != keep), key=key)


def locality_action(
    rec: ExtentRecord,
    servers: Mapping[str, ServerView],
    desired: int,
    claimant: str,
    *,
    allowed_zones: Sequence[str] = (),
) -> Action | None:
    """What the primary of a healthy extent does about `claimant`'s claim (None: nothing)."""
    from lunastor.chunk.maintenance.repair_plan import Action, ActionKind

    view = servers.get(claimant)
    if view is None or not view.takes_replicas:
        return None  # a claim of a server that cannot take the extent (now) waits
    if allowed_zones and view.zone not in allowed_zones:
        return None
    members = rec.replicas
    primary = members[0]
    if claimant == primary:
        return None

    def action(kind: ActionKind, member: str) -> Action:
        return Action(kind, rec.volume, rec.index, primary, member)

    if claimant in members:
        if len(members) > desired:
            return action(ActionKind.LOCALITY_RETIRE, retiree(rec, servers, claimant))
        return action(ActionKind.LOCALITY_HANDOVER, claimant)
    if len(members) <= desired:
        return action(ActionKind.LOCALITY_ADD, claimant)
    return None
