"""Replica placement: the builder of the balanced partition table (a "ring"). The ring's format
and its look-ups live in `lunastor/common/ring.py` (every daemon reads the stored ring) and are
re-exported here.

The model is OpenStack Swift's ring. A builder (`build_ring`) turns the chunk-server list into
a table of 2**part_power partitions x `replicas` rows of server indices; the table is a frozen,
versioned value that the meta service stores in etcd. Placement (`place_replicas`) is then a
pure look-up: extent key -> partition -> the partition's ordered replica list, row 0 being the
preferred primary. Rebuilding against the previous ring moves as few assignments as the new
server set allows, so a stored ring changes only when an operator or planner rebuilds it.

What the builder guarantees (docs/placement.md has the argument and the measured numbers):

* a partition never has two replicas on one server;
* maximal zone spread: with Z zones and R replicas, every partition puts between
  min(n_z, L-1) and min(n_z, L) replicas in zone z (n_z = usable servers in z, L the smallest
  level with sum_z min(n_z, L) >= R). With Z >= R that means one replica per zone; the
  partition always spans min(Z, R) zones. Spread wins over capacity balance when they conflict;
* replica counts follow capacity: each zone, then each server inside it, gets a share
  proportional to capacity within the bounds above ("water-filling"), rounded to integer
  quotas that the builder meets exactly except in rare zone-constrained corners (then within
  one or two);
* only "up" servers hold assignments. Draining and down servers lose theirs. An up server that
  is nearly full (free < min_free_fraction * capacity) takes nothing new: its quota is capped
  at what it held in `previous` (so with no previous ring it holds nothing);
* deterministic: the same inputs (in any order) give the same table; ties are broken by
  xxhash of stable strings, never by Python's `hash()`.

This module is pure: no I/O, no clock, no randomness beyond xxhash of its inputs.
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

import xxhash

from lunastor.common.ring import (
    MAX_PART_POWER,
    RING_FORMAT,
    STATES,
    Candidate,
    InvalidCandidate,
    InvalidExtentKey,
    InvalidParameter,
    InvalidRing,
    PlacementError,
    Ring,
    extent_key,
    partition_for,
    partition_of,
    place_replicas,
)

__all__ = [
    "MAX_PART_POWER",
    "RING_FORMAT",
    "STATES",
    "Candidate",
    "DuplicateServer",
    "IncompatibleRing",
    "InsufficientServers",
    "InvalidCandidate",
    "InvalidExtentKey",
    "InvalidParameter",
    "InvalidRing",
    "Movement",
    "PlacementError",
    "Ring",
    "build_ring",
    "extent_key",
    "fair_shares",
    "movement",
    "partition_for",
    "partition_of",
    "place_extent",
    "place_replicas",
    "primary_count_by_server",
    "replica_count_by_server",
]

MAX_SERVERS = 65536  # table entries are uint16 indices into the candidate list
DEFAULT_MIN_FREE_FRACTION = 0.05
PLACE_EXTENT_PART_POWER = 12  # for the ring-less convenience `place_extent`

# An odd step ~ P/golden ratio: visiting partitions p, p+step, ... covers every partition once
# (P is a power of two) and spreads consecutive visits across the whole table, so the slots a
# rebalance takes are scattered evenly rather than bunched at the start.
_GOLDEN = (math.sqrt(5) - 1) / 2
# Two-step moves are a last resort for zone-constrained corners; bound their cost.
_MAX_FAILED_INTERMEDIARIES = 16


class DuplicateServer(PlacementError):
    """Two candidates share one id."""


class InsufficientServers(PlacementError):
    """Fewer usable up servers than replicas (or than the zone/full-space limits need)."""

    def __init__(self, message: str, *, usable: int, replicas: int) -> None:
        super().__init__(message)
        self.usable = usable
        self.replicas = replicas


class IncompatibleRing(PlacementError):
    """`previous` cannot be rebalanced into the requested ring (different part power)."""


def replica_count_by_server(ring: Ring) -> dict[str, int]:
    """Assignments per server id over the whole table (every candidate, zeros included)."""
    counts = [0] * len(ring.candidates)
    for r in range(ring.replicas):
        for s in ring.row(r):
            counts[s] += 1
    return {c.id: counts[i] for i, c in enumerate(ring.candidates)}


def primary_count_by_server(ring: Ring) -> dict[str, int]:
    """Row-0 (preferred primary) assignments per server id."""
    counts = [0] * len(ring.candidates)
    for s in ring.row(0):
        counts[s] += 1
    return {c.id: counts[i] for i, c in enumerate(ring.candidates)}


@dataclass(frozen=True)
class Movement:
    """What changes between two rings of one part power, per partition as sets of servers."""

    moved: int  # replica assignments that now live on a server that did not hold them
    total: int  # assignments in the new ring
    gained: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)
    primaries_changed: int = 0  # partitions whose row-0 server differs

    @property
    def fraction(self) -> float:
        return self.moved / self.total if self.total else 0.0


def movement(old: Ring, new: Ring) -> Movement:
    """Count the data that must be copied to go from `old` to `new`."""
    if old.part_power != new.part_power:
        raise IncompatibleRing(f"part power {old.part_power} != {new.part_power}")
    old_rows = [old.row(r) for r in range(old.replicas)]
    new_rows = [new.row(r) for r in range(new.replicas)]
    old_ids = [c.id for c in old.candidates]
    new_ids = [c.id for c in new.candidates]
    gained: dict[str, int] = {}
    lost: dict[str, int] = {}
    moved = primaries = 0
    for p in range(new.partitions):
        before = {old_ids[v[p]] for v in old_rows}
        after = {new_ids[v[p]] for v in new_rows}
        for s in after - before:
            gained[s] = gained.get(s, 0) + 1
            moved += 1
        for s in before - after:
            lost[s] = lost.get(s, 0) + 1
        if old_ids[old_rows[0][p]] != new_ids[new_rows[0][p]]:
            primaries += 1
    return Movement(
        moved=moved,
        total=new.replicas * new.partitions,
        gained=dict(sorted(gained.items())),
        lost=dict(sorted(lost.items())),
        primaries_changed=primaries,
    )


# --- targets: how many assignments each server should hold -----------------------------------


@dataclass(frozen=True)
class _Plan:
    servers: tuple[Candidate, ...]  # usable up servers, sorted by id
    zone_of: tuple[int, ...]  # server -> zone index
    zone_lo: tuple[int, ...]  # per-partition replica bounds per zone
    zone_hi: tuple[int, ...]
    shares: tuple[Fraction, ...]  # exact fair share per server
    quotas: tuple[int, ...]  # shares rounded, summing to replicas * partitions


def _check_params(replicas: int, part_power: int, min_free_fraction: float) -> None:
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise InvalidParameter(f"replicas must be an int >= 1, got {replicas!r}")
    if (
        not isinstance(part_power, int)
        or isinstance(part_power, bool)
        or not 0 <= part_power <= MAX_PART_POWER
    ):
        raise InvalidParameter(f"part_power must be an int in [0, {MAX_PART_POWER}]")
    if not isinstance(min_free_fraction, int | float) or not 0 <= min_free_fraction < 1:
        raise InvalidParameter(f"min_free_fraction must be in [0, 1), got {min_free_fraction!r}")


def _sorted_candidates(candidates: Iterable[Candidate]) -> tuple[Candidate, ...]:
    cands = list(candidates)
    for c in cands:
        if not isinstance(c, Candidate):
            raise InvalidCandidate(f"expected a Candidate, got {type(c).__name__}")
    seen: set[str] = set()
    for c in cands:
        if c.id in seen:
            raise DuplicateServer(f"candidate id {c.id!r} appears more than once")
        seen.add(c.id)
    if len(cands) > MAX_SERVERS:
        raise InvalidParameter(f"at most {MAX_SERVERS} candidates, got {len(cands)}")
    return tuple(sorted(cands, key=lambda c: c.id))


def _plan(
    cands: tuple[Candidate, ...],
    replicas: int,
    part_power: int,
    previous_counts: Mapping[str, int],
    min_free_fraction: float,
) -> _Plan:
    parts = 1 << part_power
    up = [c for c in cands if c.state == "up"]
    caps: dict[str, int] = {}
    servers: list[Candidate] = []
    for c in up:
        cap = parts
        if c.nearly_full(min_free_fraction):
            cap = min(parts, previous_counts.get(c.id, 0))
        if cap > 0:
            servers.append(c)
            caps[c.id] = cap
    if len(servers) < replicas:
        full = len(up) - len(servers)
        raise InsufficientServers(
            f"{replicas} replicas need {replicas} distinct usable up servers, have "
            f"{len(servers)} ({len(up)} up of which {full} nearly full and new to the ring, "
            f"{sum(c.state == 'draining' for c in cands)} draining, "
            f"{sum(c.state == 'down' for c in cands)} down)",
            usable=len(servers),
            replicas=replicas,
        )
    zones = sorted({c.zone for c in servers})
    zindex = {z: i for i, z in enumerate(zones)}
    zone_of = tuple(zindex[c.zone] for c in servers)
    members: list[list[int]] = [[] for _ in zones]
    for i, z in enumerate(zone_of):
        members[z].append(i)
    n_z = [len(m) for m in members]
    level = 1
    while sum(min(n, level) for n in n_z) < replicas:
        level += 1
    zone_lo = tuple(min(n, level - 1) for n in n_z)
    zone_hi = tuple(min(n, level) for n in n_z)

    total = replicas * parts
    zone_w = [sum(servers[i].capacity for i in m) for m in members]
    zone_cap = [sum(caps[servers[i].id] for i in m) for m in members]
    z_lo = [lo * parts for lo in zone_lo]
    z_hi = [min(hi * parts, cap) for hi, cap in zip(zone_hi, zone_cap, strict=True)]
    if any(h < lo for h, lo in zip(z_hi, z_lo, strict=True)) or sum(z_hi) < total:
        raise InsufficientServers(
            "nearly full servers cannot take new replicas and the others cannot hold "
            f"{replicas} replicas of {parts} partitions with maximal zone spread",
            usable=len(servers),
            replicas=replicas,
        )
    zone_share = _water_fill(Fraction(total), zone_w, z_lo, z_hi)
    zone_quota = _round_preserving_sum(zone_share, [f"zone:{z}" for z in zones])
    shares: list[Fraction] = [Fraction(0)] * len(servers)
    quotas = [0] * len(servers)
    for z, m in enumerate(members):
        w = [servers[i].capacity for i in m]
        hi = [caps[servers[i].id] for i in m]
        exact = _water_fill(zone_share[z], w, [0] * len(m), hi)
        rounded = _round_preserving_sum(
            _water_fill(Fraction(zone_quota[z]), w, [0] * len(m), hi),
            [servers[i].id for i in m],
        )
        for k, i in enumerate(m):
            shares[i] = exact[k]
            quotas[i] = rounded[k]
    return _Plan(
        servers=tuple(servers),
        zone_of=zone_of,
        zone_lo=zone_lo,
        zone_hi=zone_hi,
        shares=tuple(shares),
        quotas=tuple(quotas),
    )


def _water_fill(
    total: Fraction, weights: Sequence[int], lo: Sequence[int], hi: Sequence[int]
) -> list[Fraction]:
    """Split `total` in proportion to weights, each part clamped to [lo_i, hi_i], exactly.

    Finds t with sum(clamp(t * w_i, lo_i, hi_i)) == total; f(t) is monotone and piecewise
    linear, so evaluate it at the breakpoints and solve on the bracketing segment.
    Requires sum(lo) <= total <= sum(hi) and weights > 0.
    """

    def clamp(x: Fraction, a: int, c: int) -> Fraction:
        return Fraction(a) if x < a else Fraction(c) if x > c else x

    def f(t: Fraction) -> Fraction:
        bounds = zip(weights, lo, hi, strict=True)
        return sum((clamp(t * w, a, c) for w, a, c in bounds), Fraction(0))

    points = sorted(
        {Fraction(b, w) for w, a, c in zip(weights, lo, hi, strict=True) for b in (a, c)}
    )
    prev = Fraction(0)
    for t in points:
        if f(t) >= total:
            break
        prev = t
    else:
        t = points[-1]
    f0, f1 = f(prev), f(t)
    x = t if f1 == f0 else prev + (t - prev) * (total - f0) / (f1 - f0)
    return [clamp(x * w, a, c) for w, a, c in zip(weights, lo, hi, strict=True)]


def _round_preserving_sum(values: Sequence[Fraction], names: Sequence[str]) -> list[int]:
    """Largest-remainder rounding; ties broken by xxhash of the names, not by list order."""
    floors = [math.floor(v) for v in values]
    left = int(sum(values)) - sum(floors)
    order = sorted(
        range(len(values)),
        key=lambda i: (-(values[i] - floors[i]), xxhash.xxh3_64_intdigest(names[i].encode())),
    )
    for i in order[:left]:
        floors[i] += 1
    return floors


def fair_shares(
    candidates: Iterable[Candidate],
    replicas: int,
    part_power: int,
    *,
    previous: Ring | None = None,
    min_free_fraction: float = DEFAULT_MIN_FREE_FRACTION,
) -> dict[str, float]:
    """Each usable server's exact fair number of assignments under the spread rules."""
    _check_params(replicas, part_power, min_free_fraction)
    cands = _sorted_candidates(candidates)
    prev = replica_count_by_server(previous) if previous is not None else {}
    plan = _plan(cands, replicas, part_power, prev, min_free_fraction)
    return {c.id: float(s) for c, s in zip(plan.servers, plan.shares, strict=True)}


# --- the builder ------------------------------------------------------------------------------


def _jitter(purpose: str, server_id: str, k: int) -> float:
    """A stable pseudo-random offset in [0, 1) for a server's k-th pick for `purpose`."""
    return xxhash.xxh3_64_intdigest(f"{purpose}\0{server_id}\0{k}".encode()) / 2.0**64


class _Builder:
    """Mutable working state of one build; `build_ring` is its only user."""

    def __init__(self, plan: _Plan, replicas: int, part_power: int) -> None:
        self.replicas = replicas
        self.parts = 1 << part_power
        self.ids = [c.id for c in plan.servers]
        self.zone_of = list(plan.zone_of)
        self.lo = list(plan.zone_lo)
        self.hi = list(plan.zone_hi)
        self.quota = list(plan.quotas)
        self.count = [0] * len(self.ids)
        self.rows: list[list[int]] = [[-1] * self.parts for _ in range(replicas)]
        # per partition, the servers (by new index) that held it in `previous`; None if fresh
        self.old: list[frozenset[int]] | None = None

    # partition helpers ------------------------------------------------------------------------
    def members(self, p: int) -> list[int]:
        return [row[p] for row in self.rows]

    def zone_counts(self, members: Sequence[int]) -> list[int]:
        zc = [0] * len(self.lo)
        for s in members:
            if s >= 0:
                zc[self.zone_of[s]] += 1
        return zc

    def excess(self, s: int) -> int:
        return self.count[s] - self.quota[s]

    # steps ------------------------------------------------------------------------------------
    def carry_over(self, previous: Ring) -> None:
        """Keep every previous assignment to a still-usable server, in the same row."""
        index = {sid: i for i, sid in enumerate(self.ids)}
        mapping = [index.get(c.id, -1) for c in previous.candidates]
        for r in range(min(self.replicas, previous.replicas)):
            row = self.rows[r]
            for p, s in enumerate(previous.row(r)):
                row[p] = mapping[s]
        prev_rows = [previous.row(r) for r in range(previous.replicas)]
        self.old = [frozenset(mapping[v[p]] for v in prev_rows) - {-1} for p in range(self.parts)]
        for row in self.rows:
            for s in row:
                if s >= 0:
                    self.count[s] += 1

    def fix_spread(self) -> None:
        """Free slots that break the zone rules under the current server set (after a zone
        appears, disappears or changes size), taking from the most over-quota servers."""
        for p in range(self.parts):
            members = self.members(p)
            zc = self.zone_counts(members)
            while True:
                holes = members.count(-1)
                deficit = sum(max(0, lo - c) for lo, c in zip(self.lo, zc, strict=True))
                over = [z for z, c in enumerate(zc) if c > self.hi[z]]
                if over:
                    zones = set(over)
                elif deficit > holes:
                    top = max(c - lo for lo, c in zip(self.lo, zc, strict=True))
                    zones = {z for z, c in enumerate(zc) if c - self.lo[z] == top}
                else:
                    break
                r = max(
                    (r for r, s in enumerate(members) if s >= 0 and self.zone_of[s] in zones),
                    key=lambda r: (self.excess(members[r]), r),
                )
                s = members[r]
                self.count[s] -= 1
                zc[self.zone_of[s]] -= 1
                members[r] = self.rows[r][p] = -1

    def fill_holes(self) -> None:
        """Give every empty slot to the eligible server furthest behind its quota.

        Each server's k-th assignment is "due" at (k + jitter) / quota; taking the earliest
        due eligible server interleaves servers smoothly along the partition axis (stride
        scheduling), so every run of partitions is balanced, and the jitter varies which
        servers share partitions so a failed server's peers are many.
        """
        ids, quota, count, zone_of = self.ids, self.quota, self.count, self.zone_of
        lo, hi = self.lo, self.hi
        any_lo = any(lo)

        def due(s: int) -> float:
            if quota[s] == 0:
                return math.inf
            return (count[s] + _jitter("slot", ids[s], count[s])) / quota[s]

        # One heap per zone, and a heap of the zones' heads: a slot whose zone rules block
        # some zones skips those zones in one step instead of popping all their servers.
        zone_heaps: list[list[tuple[float, int]]] = [[] for _ in lo]
        for s in range(len(ids)):
            zone_heaps[zone_of[s]].append((due(s), s))
        for zh in zone_heaps:
            heapq.heapify(zh)
        heads = [(zh[0][0], zh[0][1], z) for z, zh in enumerate(zone_heaps) if zh]
        heapq.heapify(heads)
        rows = self.rows
        for p in range(self.parts):
            members = [row[p] for row in rows]
            holes = members.count(-1)
            if not holes:
                continue
            zc = self.zone_counts(members)
            for r in range(self.replicas):
                if members[r] != -1:
                    continue
                tight = any_lo and sum(max(0, a - c) for a, c in zip(lo, zc, strict=True)) >= holes
                blocked = []
                while True:
                    head = heapq.heappop(heads)
                    z = head[2]
                    if zc[z] >= hi[z] or (tight and zc[z] >= lo[z]):
                        blocked.append(head)
                        continue
                    break
                # zc[z] < hi[z] <= servers in z, so z has a server not yet in the partition
                zh = zone_heaps[z]
                taken = []
                while zh[0][1] in members:
                    taken.append(heapq.heappop(zh))
                s = heapq.heappop(zh)[1]
                members[r] = rows[r][p] = s
                count[s] += 1
                zc[z] += 1
                holes -= 1
                heapq.heappush(zh, (due(s), s))
                for entry in taken:
                    heapq.heappush(zh, entry)
                heapq.heappush(heads, (zh[0][0], zh[0][1], z))
                for head in blocked:
                    heapq.heappush(heads, head)

    def order_primaries(self) -> None:
        """Choose which member of each partition is row 0 (the preferred primary) so that
        every server is primary for its share of partitions. Only for fresh builds: on a
        rebuild, rows stay where they were so that primaries do not change needlessly."""
        ids, quota, rows = self.ids, self.quota, self.rows
        done = [0] * len(ids)

        def due(s: int) -> float:
            if quota[s] == 0:
                return math.inf
            return (done[s] + _jitter("primary", ids[s], done[s])) / quota[s]

        next_due = [due(s) for s in range(len(ids))]
        for p in range(self.parts):
            members = [row[p] for row in rows]
            r = min(range(self.replicas), key=lambda r: (next_due[members[r]], r))
            s = members[r]
            if r:
                rows[0][p], rows[r][p] = s, members[0]
            done[s] += 1
            next_due[s] = due(s)

    def can_take(self, b: int, members: Sequence[int], zc: Sequence[int], a: int) -> bool:
        """May server b replace server a in a partition with these members and zone counts?"""
        if b in members:
            return False
        za, zb = self.zone_of[a], self.zone_of[b]
        return za == zb or (zc[zb] < self.hi[zb] and zc[za] > self.lo[za])

    def move_to(self, b: int, partitions: Iterable[int], changed_only: bool) -> None:
        """Move slots from over-quota servers to b, scanning `partitions`, until b is at quota.

        Each move copies one replica; `changed_only` restricts to slots already changing in
        this build, whose reassignment costs no extra copy.
        """
        old = self.old
        for p in partitions:
            if self.count[b] >= self.quota[b]:
                return
            members = self.members(p)
            zc = self.zone_counts(members)
            best = -1
            best_key = (0, 0)
            for r, a in enumerate(members):
                if self.count[a] <= self.quota[a] or not self.can_take(b, members, zc, a):
                    continue
                if changed_only and old is not None and a in old[p]:
                    continue
                key = (self.excess(a), -r)
                if best < 0 or key > best_key:
                    best, best_key = r, key
            if best >= 0:
                a = members[best]
                self.rows[best][p] = b
                self.count[a] -= 1
                self.count[b] += 1

    def scan(self, s: int) -> Iterator[int]:
        """Every partition once, from a per-server start (-1: none), in well-spread order."""
        stride = int(self.parts * _GOLDEN) | 1
        start = 0 if s < 0 else xxhash.xxh3_64_intdigest(self.ids[s].encode()) % self.parts
        return ((start + i * stride) % self.parts for i in range(self.parts))

    def balance(self) -> None:
        """Bring every server to its quota with moves from over-quota servers.

        Cheapest first: moves of slots that already change in this build (no extra copy),
        direct then two-step; then moves of unchanged slots. Two-step moves go through a
        server c at quota where the zone rules forbid the direct one (e.g. the only slot an
        over server could give is its zone's last in that partition): b takes a slot of c,
        c takes one of the over server elsewhere.
        """
        changed = self.changed_partitions() if self.old is not None else []
        if changed:
            self.balance_zones(changed, changed_only=True)
            for b in self.under():
                self.move_to(b, changed, changed_only=True)
                self.move_through(b, changed, changed_only=True, again=changed)
        self.paced_sweep()
        self.balance_zones(self.scan(-1), changed_only=False)
        for b in self.under():
            self.move_to(b, self.scan(b), changed_only=False)
            self.move_through(b, self.scan(b), changed_only=False, again=None)

    def under(self) -> list[int]:
        """Servers below quota, furthest behind first."""
        short = [s for s in range(len(self.ids)) if self.count[s] < self.quota[s]]
        return sorted(short, key=lambda s: (self.count[s] / self.quota[s], self.ids[s]))

    def balance_zones(self, partitions: Iterable[int], changed_only: bool) -> None:
        """Bring each zone's total to the sum of its servers' quotas.

        Needed where the zone rules leave a choice (say 2+1+1 replicas over three zones):
        the fill can end with one zone a few slots short, and no single server-to-server move
        fixes that when the over and under servers never share a suitable partition. A zone
        move takes the most over-quota member of an over zone and gives its slot to the most
        under-quota server of an under zone; server-level moves inside zones follow.
        """
        zones = range(len(self.lo))
        target = [0] * len(self.lo)
        total = [0] * len(self.lo)
        by_zone: list[list[int]] = [[] for _ in zones]
        for s, z in enumerate(self.zone_of):
            target[z] += self.quota[s]
            total[z] += self.count[s]
            by_zone[z].append(s)
        if target == total:
            return
        old = self.old
        for p in partitions:
            short = [z for z in zones if total[z] < target[z]]
            if not short:
                return
            members = self.members(p)
            zc = self.zone_counts(members)
            donors = [
                r
                for r, a in enumerate(members)
                if total[self.zone_of[a]] > target[self.zone_of[a]]
                and zc[self.zone_of[a]] > self.lo[self.zone_of[a]]
                and not (changed_only and old is not None and a in old[p])
            ]
            takers = [z for z in short if zc[z] < self.hi[z]]
            if not donors or not takers:
                continue
            r = max(donors, key=lambda r: (self.excess(members[r]), -r))
            zb = max(takers, key=lambda z: (target[z] - total[z], -z))
            free = [s for s in by_zone[zb] if s not in members]
            b = min(free, key=lambda s: (self.excess(s), s))
            a = members[r]
            self.rows[r][p] = b
            self.count[a] -= 1
            self.count[b] += 1
            total[self.zone_of[a]] -= 1
            total[zb] += 1

    def paced_sweep(self) -> None:
        """Direct moves made in partition order, each server kept on its pace.

        Walking partitions 0..P-1, a server's pace at p is quota * (p + 1) / P. A slot moves
        from a server over quota and at least half a slot ahead of its pace to one under quota
        and at least half a slot behind. A newcomer's slots, and each donor's losses, are
        thereby spread evenly along the partition axis, so runs of consecutive partitions
        (a volume's extents) stay balanced after a rebalance, not only the table as a whole.
        """
        count, quota, rows, parts = self.count, self.quota, self.rows, self.parts
        under = [s for s in range(len(self.ids)) if count[s] < quota[s]]
        if not under:
            return
        prefix = [0] * len(self.ids)
        for p in range(parts):
            members = [row[p] for row in rows]
            for s in members:
                prefix[s] += 1
            if not under:
                break
            scale = (p + 1) / parts
            zc: list[int] | None = None
            for r, a in enumerate(members):
                if count[a] <= quota[a] or prefix[a] - quota[a] * scale < 0.5:
                    continue
                zc = zc or self.zone_counts(members)
                best, lag = -1, 0.5
                for b in under:
                    behind = quota[b] * scale - prefix[b]
                    if behind >= lag and self.can_take(b, members, zc, a):
                        best, lag = b, behind
                if best < 0:
                    continue
                b = best
                rows[r][p] = members[r] = b
                count[a] -= 1
                count[b] += 1
                prefix[a] -= 1
                prefix[b] += 1
                zc[self.zone_of[a]] -= 1
                zc[self.zone_of[b]] += 1
                if count[b] >= quota[b]:
                    under.remove(b)
                    if not under:
                        break

    def move_through(
        self,
        b: int,
        partitions: Iterable[int],
        changed_only: bool,
        again: list[int] | None,
    ) -> None:
        """Two-step moves to b: b takes a slot of c (at quota), c one of an over server.

        c looks for its donor in `again`, or in all partitions if None. Each intermediary
        that finds none costs a full scan, so at most _MAX_FAILED_INTERMEDIARIES are tried.
        """
        old = self.old
        failed: set[int] = set()  # intermediaries that found no donor
        for p in partitions:
            if self.count[b] >= self.quota[b] or len(failed) >= _MAX_FAILED_INTERMEDIARIES:
                return
            members = self.members(p)
            zc = self.zone_counts(members)
            for r, c in enumerate(members):
                if c in failed or self.count[c] > self.quota[c]:
                    continue
                if changed_only and old is not None and c in old[p]:
                    continue
                if not self.can_take(b, members, zc, c):
                    continue
                self.rows[r][p] = b
                self.count[c] -= 1
                self.count[b] += 1
                self.move_to(c, self.scan(c) if again is None else again, changed_only)
                if self.count[c] < self.quota[c]:  # undo
                    self.rows[r][p] = c
                    self.count[c] += 1
                    self.count[b] -= 1
                    failed.add(c)
                    continue
                break

    def changed_partitions(self) -> list[int]:
        old = self.old
        assert old is not None
        return [p for p in range(self.parts) if any(row[p] not in old[p] for row in self.rows)]


def build_ring(
    candidates: Iterable[Candidate],
    replicas: int,
    part_power: int,
    previous: Ring | None = None,
    *,
    min_free_fraction: float = DEFAULT_MIN_FREE_FRACTION,
) -> Ring:
    """Build (or, given `previous`, rebalance) the partition table.

    With `previous`, every assignment to a still-usable server stays in place unless the zone
    rules or the new quotas require it to move, and the moves needed are made from the most
    over-quota servers straight to the under-quota ones, so adding a server moves about its
    fair share and removing one moves only what it held.
    """
    _check_params(replicas, part_power, min_free_fraction)
    cands = _sorted_candidates(candidates)
    if previous is not None and not isinstance(previous, Ring):
        raise InvalidParameter(f"previous must be a Ring or None, got {type(previous).__name__}")
    if previous is not None and previous.part_power != part_power:
        raise IncompatibleRing(
            f"previous ring has part power {previous.part_power}, requested {part_power}; "
            "changing the part power re-homes every extent"
        )
    prev_counts = replica_count_by_server(previous) if previous is not None else {}
    plan = _plan(cands, replicas, part_power, prev_counts, min_free_fraction)
    builder = _Builder(plan, replicas, part_power)
    if previous is not None:
        builder.carry_over(previous)
        builder.fix_spread()
    builder.fill_holes()
    builder.balance()
    if previous is None:
        builder.order_primaries()

    index = {c.id: i for i, c in enumerate(cands)}
    to_cand = [index[sid] for sid in builder.ids]
    rows = [array("H", (to_cand[s] for s in row)).tobytes() for row in builder.rows]
    return Ring(
        version=previous.version + 1 if previous is not None else 1,
        replicas=replicas,
        part_power=part_power,
        candidates=cands,
        rows=rows,
    )


# --- ring-less convenience ---------------------------------------------------------------------


def place_extent(
    extent_key: str,
    candidates: Iterable[Candidate],
    replicas: int,
    *,
    min_free_fraction: float = DEFAULT_MIN_FREE_FRACTION,
) -> list[str]:
    """Replica servers of one extent as a pure function of the extent and the candidates.

    It builds a fresh ring (part power PLACE_EXTENT_PART_POWER, cached on the inputs that
    matter: ids, zones, capacities, states and the nearly-full flag, not the exact free
    space). A fresh build does not minimise movement against anything: adding one server can
    change many placements. Production therefore builds the ring once, stores it in etcd
    (`Ring.to_dict`) and rebalances it with `build_ring(..., previous=stored)`, so placements
    change only when the stored ring does. Use this for tests and tools only.
    """
    _check_params(replicas, PLACE_EXTENT_PART_POWER, min_free_fraction)
    cands = _sorted_candidates(candidates)
    # Free space only matters through the nearly-full flag; normalising it keeps the cache
    # hitting while servers fill up.
    key = tuple(
        Candidate(
            c.id,
            c.zone,
            c.capacity,
            0 if c.nearly_full(min_free_fraction) else c.capacity,
            c.state,
        )
        for c in cands
    )
    ring = _cached_ring(key, replicas, min_free_fraction)
    return place_replicas(extent_key, ring)


@lru_cache(maxsize=8)
def _cached_ring(
    candidates: tuple[Candidate, ...], replicas: int, min_free_fraction: float
) -> Ring:
    return build_ring(
        candidates, replicas, PLACE_EXTENT_PART_POWER, min_free_fraction=min_free_fraction
    )
