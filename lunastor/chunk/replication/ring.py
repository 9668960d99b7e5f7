"""The chunk server's side of the placement ring: read the stored ring, look extents up in it,
and build a bootstrap ring when nobody has stored one yet (docs/datapath.md, "Placement ring").

The ring's builder and its format live in `lunastor/meta/placement.py` (docs/placement.md),
which chunk may not import (ARCHITECTURE.md, "Which package may import which"). This module
reads and writes the same format (`format: 1`, rows as base64 little-endian uint16) and
computes partitions the same way; `tests/unit/chunk/test_ring.py` holds the two to each other.
"""

from __future__ import annotations

import base64
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

RING_FORMAT = 1
BOOTSTRAP_PART_POWER = 8


class RingError(ValueError):
    """A stored ring cannot be used (bad format), or no ring can be built (too few servers)."""


@dataclass(frozen=True, slots=True)
class Server:
    id: str
    zone: str
    capacity: int
    free: int
    state: str = "up"


def partition_for(volume_id: str, index: int, part_power: int) -> int:
    """Same as `lunastor.meta.placement.partition_for(f"{volume_id}/{index}", part_power)`."""
    start = xxhash.xxh3_64_intdigest(volume_id.encode())
    return (start + index) & ((1 << part_power) - 1)


def _le(raw: bytes) -> array[int]:
    a = array("H")
    a.frombytes(raw)
    if sys.byteorder != "little":
        a.byteswap()
    return a


@dataclass(frozen=True, slots=True)
class StoredRing:
    version: int
    replicas: int
    part_power: int
    servers: tuple[str, ...]  # candidate ids, sorted
    rows: tuple[array[int], ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoredRing:
        try:
            if data.get("format") != RING_FORMAT:
                raise RingError(f"unsupported ring format {data.get('format')!r}")
            replicas, part_power = int(data["replicas"]), int(data["part_power"])
            servers = tuple(str(c["id"]) for c in data["candidates"])
            rows = tuple(_le(base64.b64decode(t, validate=True)) for t in data["table"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, RingError):
                raise
            raise RingError(f"bad ring: {exc}") from None
        parts = 1 << part_power
        if len(rows) != replicas or any(len(r) != parts for r in rows):
            raise RingError("ring table does not match replicas x 2^part_power")
        if any(v >= len(servers) for r in rows for v in r):
            raise RingError("ring table names a server index out of range")
        return cls(int(data.get("version", 1)), replicas, part_power, servers, rows)

    def place(self, volume_id: str, index: int) -> list[str]:
        """The ordered replica server ids of an extent; the first is the preferred primary."""
        p = partition_for(volume_id, index, self.part_power)
        return [self.servers[r[p]] for r in self.rows]


def bootstrap_ring(
    servers: Sequence[Server], replicas: int, part_power: int = BOOTSTRAP_PART_POWER
) -> dict[str, Any]:
    """A valid ring in the stored format, built by rendezvous hashing with zone spread.

    Balanced only to hashing noise (the planner's `build_ring(previous=...)` improves it); its
    job is to let the first allocation happen before any planner ran. Deterministic in the
    server set, so two chunk servers racing to create it propose the same table.
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

    def encode(row: array[int]) -> str:
        out = array("H", row)
        if sys.byteorder != "little":
            out.byteswap()
        return base64.b64encode(out.tobytes()).decode("ascii")

    return {
        "format": RING_FORMAT,
        "version": 1,
        "replicas": replicas,
        "part_power": part_power,
        "candidates": [
            {
                "id": c.id,
                "zone": c.zone,
                "capacity": max(1, c.capacity),  # placement refuses an up server of size 0
                "free": min(max(0, c.free), max(1, c.capacity)),
                "state": "up",
            }
            for c in cands
        ],
        "table": [encode(r) for r in rows],
    }
