"""The chunk server's own part of placement: a bootstrap ring for when nobody stored one yet
(docs/datapath.md, "Placement ring").

The ring's format and look-ups are `lunastor/common/ring.py`; its builder, which meta's
planner leader uses to rebuild the stored ring as servers join and leave, is
`lunastor/meta/placement.py`, which chunk may not import (ARCHITECTURE.md). The bootstrap
only lets the first allocation happen before any planner ran.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from lunastor.common.ring import Candidate, Ring

BOOTSTRAP_PART_POWER = 8


class RingError(ValueError):
    """No ring can be built (too few servers up), or a stored ring cannot be used."""


@dataclass(frozen=True, slots=True)
class Server:
    id: str
    zone: str
    capacity: int
    free: int
    state: str = "up"


def bootstrap_ring(
    servers: Sequence[Server], replicas: int, part_power: int = BOOTSTRAP_PART_POWER
) -> Ring:
    """A valid ring built by rendezvous hashing with zone spread.

    Balanced only to hashing noise (the planner's `build_ring(previous=...)` improves it);
    deterministic in the server set, so two chunk servers racing to create it propose the
    same table.
    """
    cands = sorted((s for s in servers if s.state == "up"), key=lambda s: s.id)
    if len(cands) < replicas:
        raise RingError(f"{len(cands)} chunk servers are up, {replicas} replicas needed")
    parts = 1 << part_power
    rows = [array("H", [0] * parts) for _ in range(replicas)]
    for p in range(parts):
        ranked = sorted(
            range(len(cands)),
            key=lambda i: xxhash.xxh3_64_intdigest(f"{p}/{cands[i].id}".encode()),
        )
        chosen: list[int] = []
        zones: dict[str, int] = {}
        # Round-robin over zones: at most one replica per zone until every zone has one.
        while len(chosen) < replicas:
            level = min(zones.get(cands[i].zone, 0) for i in ranked if i not in chosen)
            pick = next(
                i for i in ranked if i not in chosen and zones.get(cands[i].zone, 0) == level
            )
            chosen.append(pick)
            zones[cands[pick].zone] = zones.get(cands[pick].zone, 0) + 1
        for r, i in enumerate(chosen):
            rows[r][p] = i
    capacities = [max(1, c.capacity) for c in cands]  # an up server of size 0 is refused
    return Ring(
        version=1,
        replicas=replicas,
        part_power=part_power,
        candidates=[
            Candidate(c.id, c.zone, cap, min(max(0, c.free), cap), "up")
            for c, cap in zip(cands, capacities, strict=True)
        ],
        rows=[r.tobytes() for r in rows],
    )
