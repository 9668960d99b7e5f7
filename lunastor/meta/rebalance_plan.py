"""Which replicas to move so that every chunk server holds its fair share: a pure function of
the extent map and the chunk servers (docs/placement.md, "Rebalancing").

No IO and no clock: `meta/rebalance.py` reads the inputs from etcd, stores the moves as
intents (`/v1/rebalance/...`), and the extents' primaries carry them out with the existing
join-then-retire mechanism (chunk/replication/join.py, driven by the repair loop).

- **Fair share** of a usable server (up, not draining): its share of every extent's replicas
  under the ring builder's rules (`placement.fair_shares`: proportional to capacity, clamped
  so that each extent spans as many zones as it can), summed over the replica counts in use.
  Draining and down servers have no share: the repair loop moves their replicas (drain,
  rebuild), and this planner leaves extents with such a member alone until it has.
- **Balanced**: every server within `tolerance` of its fair share (2.5%, half the 5% goal),
  or as close as whole replicas allow (no single move would bring the two servers it
  involves closer to theirs). Before balancing, whatever the tolerance: a replica outside its
  volume's zones (CSI topology) is moved into them — a clone's extent starts as a local copy
  on its source's servers, whatever the clone's zones (docs/snapshots.md) — and then an
  extent that spans fewer zones than it could (a zone was added) gets a replica moved into
  a zone it lacks.
- **A move** takes one replica of a healthy extent from the most loaded server to the least
  loaded one that may take it: not already a member, and not a zone that the extent's other
  members already use unless it is the source's own zone (a move never narrows an extent's
  zone spread). Among candidate extents it prefers those whose ring placement already wants
  the target (so data and ring converge and later rebuilds move less), then secondaries over
  primaries (a primary hands over, which costs a generation change), then a stable hash.
- **Repair first**: while any extent has a member down or draining, lacks a replica or is
  converging after a failover, no new move is planned (moves in flight finish).
- **Throttle**: at most `max_moves` moves outstanding in the cluster and `max_per_server`
  per server (as source or target), counting the intents still in flight.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import xxhash

from lunastor.common.records import ExtentRecord, of_volume
from lunastor.common.ring import Candidate
from lunastor.meta.placement import InsufficientServers, fair_shares

GOAL = 0.05  # every server within 5% of its fair share (issue 17)
# The planner aims at half the goal, so that extents the ring places meanwhile (balanced only
# to hashing noise) do not push a server back out of it.
DEFAULT_TOLERANCE = GOAL / 2
SHARE_PART_POWER = 12  # fair_shares counts in ring slots; only the ratio is used here

ExtentId = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Holder:
    """A chunk server as the balancer sees it."""

    id: str
    zone: str
    capacity: int
    usable: bool = True  # up and not draining: may hold replicas and take new ones


@dataclass(frozen=True, slots=True)
class Move:
    """Add `target` to the extent, then retire `source` (join then retire)."""

    volume: str
    index: int
    source: str
    target: str


@dataclass(frozen=True)
class Balance:
    """Replicas per usable server against its fair share."""

    counts: dict[str, int]
    targets: dict[str, float]

    def deviation(self, server: str) -> float:
        """(count - fair share) / fair share; 0 for a server with no share and no replicas."""
        target = self.targets.get(server, 0.0)
        count = self.counts.get(server, 0)
        if target == 0:
            return 0.0 if count == 0 else float("inf")
        return (count - target) / target

    @property
    def worst(self) -> float:
        """The largest |deviation| over the usable servers."""
        return max((abs(self.deviation(s)) for s in self.targets), default=0.0)

    @property
    def excess(self) -> int:
        """Replicas above fair share, summed over servers: about the moves still needed."""
        return sum(max(0, round(self.counts.get(s, 0) - t)) for s, t in self.targets.items())


@dataclass(frozen=True)
class RebalancePlan:
    moves: list[Move]
    before: Balance
    after: Balance  # if every move in flight and planned completes
    balanced: bool  # `after` is within tolerance (or as close as whole replicas allow)
    stuck: bool = False  # out of tolerance, but no allowed move improves it
    skipped: int = 0  # extents left alone: a member is down, draining or unknown
    notes: list[str] = field(default_factory=list)


def fair_targets(servers: Sequence[Holder], replica_counts: Mapping[int, int]) -> dict[str, float]:
    """Each usable server's fair number of replicas, given how many extents have each
    replica count (`{replicas: extents}`)."""
    usable = [s for s in servers if s.usable and s.capacity > 0]
    out = dict.fromkeys((s.id for s in usable), 0.0)
    if not usable:
        return out
    cands = [Candidate(s.id, s.zone, s.capacity, s.capacity, "up") for s in usable]
    slots_per_row = 1 << SHARE_PART_POWER
    for replicas, extents in sorted(replica_counts.items()):
        if extents <= 0 or replicas <= 0:
            continue
        r = min(replicas, len(usable))
        try:
            shares = fair_shares(cands, r, SHARE_PART_POWER, min_free_fraction=0.0)
        except InsufficientServers:  # pragma: no cover - r <= usable servers
            continue
        total = r * slots_per_row
        for sid, share in shares.items():
            out[sid] += share / total * r * extents
    return out


def measure(extents: Iterable[ExtentRecord], servers: Sequence[Holder]) -> Balance:
    """How balanced the extent map is now."""
    counts: Counter[str] = Counter()
    per_count: Counter[int] = Counter()
    for rec in extents:
        if rec.replicas:
            per_count[len(rec.replicas)] += 1
            counts.update(rec.replicas)
    targets = fair_targets(servers, per_count)
    return Balance({s: counts.get(s, 0) for s in targets}, targets)


def _preference(source: str, rec: ExtentRecord) -> tuple[bool, int]:
    """Order of the extents to move off `source`: secondaries first, then a stable hash."""
    tie = xxhash.xxh3_64_intdigest(f"{rec.volume}/{rec.index}/{source}".encode())
    return rec.primary == source, tie


def plan_moves(
    extents: Iterable[ExtentRecord],
    servers: Sequence[Holder],
    *,
    in_flight: Iterable[Move] = (),
    placement: Callable[[str, int], Sequence[str]] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    max_moves: int = 64,
    max_per_server: int = 4,
    zones: Mapping[str, Sequence[str]] | None = None,
    claims: Mapping[ExtentId, str] | None = None,
) -> RebalancePlan:
    """The next moves toward balance (at most `max_moves` outstanding, in flight included).

    `in_flight`: moves already handed out and not finished; they count as done (the source
    has given the replica up, the target holds it), and their extents are not moved again.
    `placement(volume, index)`: the ring's servers for the extent, to prefer moves toward it.
    `zones`: volume -> the zones its CSI topology allows (absent: any); no move leaves them.
    `claims`: extent -> the access point that claimed its primary (locality, chunk
    `maintenance/locality.py`): the claimant's replica of it is never moved away.
    """
    zone = {s.id: s.zone for s in servers}
    claimed = claims or {}

    def may_hold(rec: ExtentRecord, server: str) -> bool:
        allowed = of_volume(zones or {}, rec.volume)
        return not allowed or zone[server] in allowed

    usable = {s.id for s in servers if s.usable and s.capacity > 0}
    records = [r for r in extents if r.replicas]
    before = measure(records, servers)
    counts = dict(before.counts)
    targets = before.targets
    flight = {(m.volume, m.index): m for m in in_flight}
    busy: Counter[str] = Counter()
    for move in flight.values():
        busy[move.source] += 1
        busy[move.target] += 1
        if move.source in counts:
            counts[move.source] -= 1
        if move.target in counts:
            counts[move.target] += 1

    # Movable extents by the server they could be moved off, best candidates first.
    on: dict[str, list[ExtentRecord]] = defaultdict(list)
    skipped = 0
    for rec in records:
        if (rec.volume, rec.index) in flight:
            continue
        if rec.converging or not all(m in usable for m in rec.replicas):
            skipped += 1
            continue
        if len(rec.replicas) < rec.copies:
            skipped += 1  # below its replica count: the repair loop adds one first
            continue
        for m in rec.replicas:
            on[m].append(rec)
    if skipped:
        # Repair first: while any extent waits for the repair loop (a member down or
        # draining, a replica missing, a failover converging), no new move competes with it
        # for copy bandwidth or makes its member count harder to reason about.
        after = Balance(counts, targets)
        return RebalancePlan([], before, after, _within(counts, targets, tolerance), False, skipped)
    for sid, recs in on.items():
        recs.sort(key=partial(_preference, sid))

    def slack(s: str) -> float:
        return tolerance * targets[s]

    def allowed(rec: ExtentRecord, source: str, target: str) -> bool:
        if target in rec.replicas or not may_hold(rec, target):
            return False
        if zone[target] == zone[source]:
            return True
        return zone[target] not in {zone[m] for m in rec.replicas if m != source}

    def pick(source: str, target: str) -> ExtentRecord | None:
        best: ExtentRecord | None = None
        for rec in on.get(source, ()):
            if (rec.volume, rec.index) in taken or not allowed(rec, source, target):
                continue
            if claimed.get((rec.volume, rec.index)) == source:
                continue  # locality: its claimant keeps it
            if placement is None:
                return rec
            wanted = placement(rec.volume, rec.index)
            if target in wanted and source not in wanted:
                return rec
            if best is None:
                best = rec
        return best

    moves: list[Move] = []
    taken: set[ExtentId] = set()
    budget = max_moves - len(flight)

    def take(rec: ExtentRecord, source: str, target: str) -> None:
        nonlocal budget
        taken.add((rec.volume, rec.index))
        moves.append(Move(rec.volume, rec.index, source, target))
        counts[source] -= 1
        counts[target] += 1
        busy[source] += 1
        busy[target] += 1
        budget -= 1

    # First, replicas outside their volume's zones (a clone's extents are copied on their
    # source's servers, whatever the clone's zones): the zones are a promise to the CO (CSI
    # accessible_topology), so each is moved into them whatever the tolerance. A secondary
    # goes first (a primary's move hands it over); the target is, of the servers in the zones,
    # one in a zone the extent does not use yet, then the least loaded.
    for rec in records:
        if budget <= 0:
            break
        if (rec.volume, rec.index) in flight or rec.converging:
            continue
        outside = [m for m in rec.replicas if not may_hold(rec, m) and busy[m] < max_per_server]
        if not outside:
            continue
        inside = {zone[m] for m in rec.replicas if may_hold(rec, m)}
        fresh = [
            s
            for s in usable
            if s not in rec.replicas and may_hold(rec, s) and busy[s] < max_per_server
        ]
        if fresh:
            source = max(outside, key=lambda m: (m != rec.primary, counts[m] - targets[m], m))
            target = min(fresh, key=lambda s: (zone[s] in inside, counts[s] - targets[s], s))
            take(rec, source, target)

    # Then extents that span fewer zones than they could (a zone appeared, or they were
    # placed while it was down): spread is about surviving a zone's loss, not balance, so it
    # is restored whatever the tolerance.
    for rec in records:
        if budget <= 0:
            break
        key = (rec.volume, rec.index)
        if key in flight or key in taken or rec.converging:
            continue
        if not all(m in usable for m in rec.replicas):
            continue
        used = Counter(zone[m] for m in rec.replicas)
        zones_up = len({zone[s] for s in usable if may_hold(rec, s)})
        if len(used) >= min(zones_up, len(rec.replicas)):
            continue
        crowded = [
            m
            for m in rec.replicas
            if used[zone[m]] > 1
            and busy[m] < max_per_server
            and claimed.get((rec.volume, rec.index)) != m
        ]
        fresh = [
            s
            for s in usable
            if zone[s] not in used and busy[s] < max_per_server and may_hold(rec, s)
        ]
        if crowded and fresh:
            source = max(crowded, key=lambda m: (counts[m] - targets[m], m))
            target = min(fresh, key=lambda s: (counts[s] - targets[s], s))
            take(rec, source, target)

    stuck = False
    while budget > 0:
        if _within(counts, targets, tolerance):
            break
        free = [s for s in usable if busy[s] < max_per_server]
        over = sorted((s for s in free if on.get(s)), key=lambda s: (targets[s] - counts[s], s))
        under = sorted(free, key=lambda s: (counts[s] - targets[s], s))
        chosen: tuple[ExtentRecord, str, str] | None = None
        for source in over:
            gap = counts[source] - targets[source]
            for target in under:
                if gap - (counts[target] - targets[target]) <= 1:
                    break  # no move from here improves the balance
                if gap <= slack(source) and counts[target] >= targets[target] - slack(target):
                    break  # both already within tolerance
                found = pick(source, target)
                if found is not None:
                    chosen = (found, source, target)
                    break
            if chosen is not None:
                break
        if chosen is None:  # stuck unless it is the throttle that stopped us
            throttled = any(busy[s] >= max_per_server for s in usable)
            stuck = not throttled and not _within(counts, targets, tolerance)
            break
        take(*chosen)
    after = Balance(counts, targets)
    return RebalancePlan(moves, before, after, _within(counts, targets, tolerance), stuck, skipped)


def _within(counts: Mapping[str, int], targets: Mapping[str, float], tolerance: float) -> bool:
    """Every server within tolerance, or as close as whole replicas allow: no pair of servers
    whose gaps differ by more than one replica while one of them is out of tolerance."""
    if not targets:
        return True
    gaps = {s: counts.get(s, 0) - t for s, t in targets.items()}
    out = [s for s, g in gaps.items() if abs(g) > tolerance * targets[s]]
    if not out:
        return True
    hi, lo = max(gaps.values()), min(gaps.values())
    return hi - lo <= 1
