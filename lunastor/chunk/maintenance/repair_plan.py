"""What to do about each extent's replica set: a pure function of the extent map and the chunk
servers' states (docs/datapath.md, "Rebuild, catch-up and drain").

No IO and no clock here: `repair.py` gathers the inputs (the watched extent map, live records,
drain intents, volume records, the ring, how long each server has been down) and applies the
actions this server is the actor of. One action per extent per pass, the most urgent first:

1. the extent is converging, or its primary is dead and not expected back: **failover**
   (the first live member runs the access path's failover/convergence); a primary that is
   *expected back* (stopped on purpose, or missing since this server started: restart.py)
   is waited for instead (**wait**), bounded by its record (docs/faults.md, "Planned
   restarts");
2. a secondary has been down for `replace_after` and is not expected back: **remove-dead**
   (by the primary);
3. a secondary is down for less than that (or expected back), or some server went down less
   than `replace_after` ago (or is expected back) while the extent lacks replicas: **wait**
   (it may come back and catch up cheaply), except that an extent below `min_replicas`
   (refusing writes) gets a member at once;
4. fewer non-draining members than the volume's `replicas`: **add-replica** (the primary joins
   a target: a live, non-draining server that holds an old replica file of the extent if any
   (catch-up), else the least used zone, then ring order; only servers in the volume's zones
   when its CSI topology restricts it, `VolumeRecord.zones`); **no-candidate** when none fits;
5. a draining member whose replacement has joined, or more members than wanted:
   **remove-extra** (a draining secondary before a draining primary, which hands over);
6. a healthy extent with a rebalancing move from meta (`/v1/rebalance/...`,
   docs/placement.md): **rebalance-add** of its target (join), then **rebalance-retire** of
   its source once the target is a member. A move whose target cannot take the replica now
   (down, starting, draining) waits for meta to withdraw it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import xxhash

from lunastor.chunk.maintenance.locality_plan import locality_action
from lunastor.common.records import ExtentRecord, of_volume

log = logging.getLogger(__name__)


class ActionKind(StrEnum):
    FAILOVER = "failover"
    REMOVE_DEAD = "remove-dead"
    ADD = "add-replica"
    REMOVE_EXTRA = "remove-extra"
    WAIT = "wait"  # nothing to do yet: a member may come back
    NO_CANDIDATE = "no-candidate"  # replicas are missing and no server can take one
    REBALANCE_ADD = "rebalance-add"  # a move's target joins
    REBALANCE_RETIRE = "rebalance-retire"  # the move's target joined: its source goes
    # locality (locality_plan.py): an access point claimed the extent's primary
    LOCALITY_ADD = "locality-add"  # the claimant joins
    LOCALITY_RETIRE = "locality-retire"  # it joined: another member goes
    LOCALITY_HANDOVER = "locality-handover"  # it is a member: the primary hands over

    @property
    def locality(self) -> bool:
        return self in (
            ActionKind.LOCALITY_ADD,
            ActionKind.LOCALITY_RETIRE,
            ActionKind.LOCALITY_HANDOVER,
        )

    @property
    def acts(self) -> bool:
        return self not in (ActionKind.WAIT, ActionKind.NO_CANDIDATE)


@dataclass(frozen=True, slots=True)
class ServerView:
    id: str
    zone: str = "default"
    live: bool = True
    draining: bool = False
    down_for: float = 0.0  # seconds since its live record went away (0 while live)
    # away on purpose (a planned restart) or missing since our start, within its bound:
    # waited for, never failed over or replaced (restart.py)
    expected: bool = False

    @property
    def takes_replicas(self) -> bool:
        """Can be given a replica now: live and serving (not starting or stopping: its data
        port may not be up) and not draining."""
        return self.live and not self.expected and not self.draining


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    volume: str
    index: int
    actor: str  # the chunk server that applies it
    member: str = ""  # the target (add-replica) or the member removed


def _live(servers: Mapping[str, ServerView], chunk: str) -> bool:
    s = servers.get(chunk)
    return s is not None and s.live


def _expected(servers: Mapping[str, ServerView], chunk: str) -> bool:
    """Down (or not serving yet) and expected back: waited for, not replaced."""
    s = servers.get(chunk)
    return s is not None and s.expected


def choose_target(
    rec: ExtentRecord,
    servers: Mapping[str, ServerView],
    *,
    placement: Sequence[str] = (),
    old_holders: Iterable[str] = (),
    allowed_zones: Sequence[str] = (),
) -> str | None:
    """The server a new replica of `rec` goes to, or None if no server can take it.
    `allowed_zones`: the volume's zones (empty: any zone)."""
    members = set(rec.replicas)
    holders = set(old_holders)
    cands = [
        s
        for s in servers.values()
        if s.takes_replicas
        and s.id not in members
        and (not allowed_zones or s.zone in allowed_zones)
    ]
    if not cands:
        return None
    zones = Counter(
        servers[m].zone for m in rec.replicas if m in servers and not servers[m].draining
    )
    rank = {c: i for i, c in enumerate(placement)}

    def key(s: ServerView) -> tuple[bool, int, int, int]:
        tie = xxhash.xxh3_64_intdigest(f"{rec.volume}/{rec.index}/{s.id}".encode())
        return (s.id not in holders, zones[s.zone], rank.get(s.id, len(rank)), tie)

    return min(cands, key=key).id


def plan_extent(
    rec: ExtentRecord,
    servers: Mapping[str, ServerView],
    desired: int,
    *,
    replace_after: float,
    placement: Sequence[str] = (),
    old_holders: Iterable[str] = (),
    move: tuple[str, str] | None = None,
    allowed_zones: Sequence[str] = (),
    claim: str | None = None,
    min_replicas: int = 1,
) -> Action | None:
    """The one action `rec` needs now, or None when it is as it should be. `move`: a
    rebalancing move (source, target) meta handed out for it. `allowed_zones`: the zones
    the volume may be placed in (empty: any). `claim`: the access point that claimed the
    extent's primary (locality_plan.py), acted on when nothing else is to be done.
    `min_replicas`: the members a primary needs to acknowledge writes (node.py)."""
    members = rec.replicas
    live = [m for m in members if _live(servers, m)]
    if not live:
        return None  # nobody left to act; the data is unreachable until a member returns

    def action(kind: ActionKind, actor: str, member: str = "") -> Action:
        return Action(kind, rec.volume, rec.index, actor, member)

    primary = members[0]
    if not rec.converging and _expected(servers, primary):
        return action(ActionKind.WAIT, live[0], primary)
    if rec.converging or not _live(servers, primary):
        return action(ActionKind.FAILOVER, live[0])
    away = [m for m in members[1:] if _expected(servers, m)]
    if away:
        # a member restarting (down, or live and not serving yet): nothing changes the
        # replica set meanwhile (a join's ordered copies would fail at it and remove it)
        return action(ActionKind.WAIT, primary, away[0])
    dead = [m for m in members[1:] if not _live(servers, m)]
    for m in dead:
        view = servers.get(m)
        if view is None or (view.down_for >= replace_after and not view.expected):
            return action(ActionKind.REMOVE_DEAD, primary, m)
    if dead:
        return action(ActionKind.WAIT, primary, dead[0])
    draining = [m for m in members if servers[m].draining]
    keep = len(members) - len(draining)
    if keep < desired:
        recent = sorted(
            s.id
            for s in servers.values()
            if not s.draining and (s.expected or (not s.live and s.down_for < replace_after))
        )
        # A server that may come back is waited for (its catch-up beats a copy), unless the
        # extent is below `min_replicas`: its writes are refused until a member joins, and
        # a join takes a moment where the wait takes up to `replace_after`. One that is back
        # but still starting (live, its data port not yet up) too: asked whether it holds an
        # old replica file, it does not answer yet, and a copy to another server was chosen.
        if recent and keep >= min(min_replicas, desired):
            return action(ActionKind.WAIT, primary, recent[0])
        target = choose_target(
            rec,
            servers,
            placement=placement,
            old_holders=old_holders,
            allowed_zones=allowed_zones,
        )
        if target is None:
            return action(ActionKind.NO_CANDIDATE, primary)
        return action(ActionKind.ADD, primary, target)
    if draining:
        # secondaries first: a draining primary hands the extent over last
        victim = next((m for m in draining if m != primary), primary)
        return action(ActionKind.REMOVE_EXTRA, primary, victim)
    if move is not None and move[0] in members:
        source, target = move
        if target in members:
            return action(ActionKind.REBALANCE_RETIRE, primary, source)
        view = servers.get(target)
        if (
            view is not None
            and view.takes_replicas
            and (not allowed_zones or view.zone in allowed_zones)
            and len(members) <= desired
        ):
            return action(ActionKind.REBALANCE_ADD, primary, target)
    if claim is not None and move is None:
        try:
            local = locality_action(rec, servers, desired, claim, allowed_zones=allowed_zones)
        except Exception:  # locality must never stop a repair pass
            log.exception("locality plan of %s/%d failed", rec.volume, rec.index)
            local = None
        if local is not None:
            return local
    if len(members) > desired:
        return action(ActionKind.REMOVE_EXTRA, primary, members[-1])
    return None


def plan(
    extents: Iterable[ExtentRecord],
    servers: Mapping[str, ServerView],
    desired: Mapping[str, int],
    *,
    replace_after: float,
    placements: Mapping[tuple[str, int], Sequence[str]] | None = None,
    old_holders: Mapping[tuple[str, int], Iterable[str]] | None = None,
    moves: Mapping[tuple[str, int], tuple[str, str]] | None = None,
    zones: Mapping[str, Sequence[str]] | None = None,
    claims: Mapping[tuple[str, int], str] | None = None,
    min_replicas: int = 1,
) -> list[Action]:
    """Every extent's action. Extents of volumes without a record (deleted) are left alone:
    they belong to garbage collection. `zones`: volume -> the zones it may be placed in.
    `claims`: (volume, index) -> the access point that claimed its primary (locality)."""
    out = []
    for rec in extents:
        want = of_volume(desired, rec.volume)  # a preserved copy: its volume's count
        if want is None or not rec.replicas:
            continue
        key = (rec.volume, rec.index)
        act = plan_extent(
            rec,
            servers,
            want,
            replace_after=replace_after,
            placement=(placements or {}).get(key, ()),
            old_holders=(old_holders or {}).get(key, ()),
            move=(moves or {}).get(key),
            allowed_zones=of_volume(zones or {}, rec.volume) or (),
            claim=(claims or {}).get(key),
            min_replicas=min_replicas,
        )
        if act is not None:
            out.append(act)
    return out
