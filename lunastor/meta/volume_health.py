"""A volume's health from its extent map and the chunk servers' states: one pure function,
shown by the dashboard and the status endpoints (docs/dashboard.md, "Volume health").

Per extent, the first that applies:

- **unavailable**: no member is up; the data cannot be read until one returns.
- **rebuilding**: every wanted member is live and they are being made identical after a
  failover (`converging`), or a replica is missing, no lost server is still within its
  `replace_after` wait, and a live, non-draining server outside the set can take the new
  replica (the primary's repair loop joins one: docs/datapath.md, "Rebuild, catch-up and
  drain").
- **degraded**: a member is down and still named, or a replica is missing while the repair
  loop waits (a server went down less than `replace_after` ago: it may come back and catch
  up cheaply, `repair_plan.py`'s wait rule), or no server can take one; this holds while
  the survivors converge after a failover too (the copies are fewer than wanted).
- **ok**: every wanted replica is on a live server (a draining member still counts: it holds
  the data until its replacement has joined).

The volume takes its worst extent's state, in the order unavailable > rebuilding > degraded >
ok: a rebuild under way says more than the extents still waiting for it. A thin volume's
extents that were never written have no entry and are always ok.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from lunastor.common.records import ExtentRecord


class Health(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    REBUILDING = "rebuilding"
    UNAVAILABLE = "unavailable"


SEVERITY = {Health.OK: 0, Health.DEGRADED: 1, Health.REBUILDING: 2, Health.UNAVAILABLE: 3}


@dataclass(frozen=True)
class Servers:
    """The chunk servers as the health rules need them."""

    live: frozenset[str]
    draining: frozenset[str] = frozenset()
    waiting_for: frozenset[str] = frozenset()  # lost less than `replace_after` ago
    # down, and the rebuild planner has not opened an operation for it yet (it does within
    # its interval): lost just now if some extent still names it
    unplanned: frozenset[str] = frozenset()

    def seeing(self, extents: Iterable[ExtentRecord]) -> Servers:
        """The servers as `extents` show them: an unplanned server they still name is being
        waited for (a failover may already have dropped it from the extents it led, which
        are then missing a replica while the repair loops wait, not rebuilding)."""
        named = {m for rec in extents for m in rec.replicas} & self.unplanned
        if not named:
            return self
        return dataclasses.replace(self, waiting_for=self.waiting_for | named)

    def spare_for(self, members: Sequence[str]) -> bool:
        """Could a live, non-draining server outside `members` take a replica?"""
        return any(s not in members and s not in self.draining for s in self.live)


def extent_health(rec: ExtentRecord, wanted: int, servers: Servers) -> Health:
    members = rec.replicas
    if not any(m in servers.live for m in members):
        return Health.UNAVAILABLE
    if any(m not in servers.live for m in members):
        return Health.DEGRADED
    if len(members) < wanted:
        rebuilding = not servers.waiting_for and servers.spare_for(members)
        return Health.REBUILDING if rebuilding else Health.DEGRADED
    # after the redundancy rules: a failover's short convergence among fewer copies than
    # wanted is the degraded state the operator must see, not a rebuild
    return Health.REBUILDING if rec.converging else Health.OK


@dataclass(frozen=True)
class VolumeHealth:
    state: Health
    detail: str
    extents: int  # allocated extents
    counts: dict[str, int]  # extents per non-ok state

    def view(self) -> dict[str, object]:
        return {
            "health": str(self.state),
            "health_detail": self.detail,
            "extents": self.extents,
            "extents_by_health": self.counts,
        }


def volume_health(extents: Sequence[ExtentRecord], wanted: int, servers: Servers) -> VolumeHealth:
    counts = {h: 0 for h in Health}
    servers = servers.seeing(extents)
    down: set[str] = set()
    total = 0
    for rec in extents:
        total += 1
        counts[extent_health(rec, wanted, servers)] += 1
        down.update(m for m in rec.replicas if m not in servers.live)
    state = max((h for h in Health if counts[h]), key=SEVERITY.__getitem__, default=Health.OK)
    return VolumeHealth(
        state,
        _detail(counts, total, sorted(down), sorted(servers.waiting_for)),
        total,
        {str(h): n for h, n in counts.items() if h is not Health.OK and n},
    )


def _detail(counts: dict[Health, int], total: int, down: list[str], waiting: list[str]) -> str:
    if total == 0:
        return "no data written yet"
    parts = []
    if counts[Health.UNAVAILABLE]:
        parts.append(f"{counts[Health.UNAVAILABLE]} of {total} extents have no live replica")
    if counts[Health.REBUILDING]:
        parts.append(f"{counts[Health.REBUILDING]} of {total} extents rebuilding")
    if counts[Health.DEGRADED]:
        parts.append(f"{counts[Health.DEGRADED]} of {total} extents missing a replica")
    if down:
        parts.append(f"down: {', '.join(down)}")
    if counts[Health.DEGRADED] and waiting:
        parts.append(f"waiting for {', '.join(waiting)} to come back before replacing it")
    return "; ".join(parts) if parts else f"all {total} extents fully replicated"
