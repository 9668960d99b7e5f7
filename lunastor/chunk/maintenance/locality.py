"""Locality: the primary follows the access point (docs/datapath.md, "Locality").

Three parts, the decisions pure in `locality_plan.py`:

* `Activity`: every IO an access point serves notes its extent (a dict increment);
* `Claimer.run_once()` (each repair pass, on every chunk server): for the extents this
  access point kept busy in the last window, write a `LocalityClaim` where
  `decide_claim` says so, by a transaction on the claim's mod_revision (or its absence);
* `hand_over(node, volume, index, target)`: the primary gives the extent's primary to a
  member at a clean point: under the extent lock with every forward settled (so every
  member applied every seq assigned so far), the other members and our own replica adopt
  `gen + 1`, then `{gen + 1, [target, the others...]}` is committed by a transaction on the
  entry's stamp (as a failover or a drain's hand-over). We stay a member; the target
  becomes primary at its first write with `next_seq = applied + 1`.

Joining the claimant and retiring another member are the repair loop's join and retire.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from functools import partial

from prometheus_client import Counter

from lunastor.chunk.maintenance.locality_plan import ClaimPolicy, decide_claim
from lunastor.chunk.replication.extentmap import ExtentMap
from lunastor.chunk.replication.node import DataNode
from lunastor.chunk.wire.messages import SetGen
from lunastor.chunk.wire.peer import PeerError
from lunastor.common.etcd import Compare, Etcd, EtcdError, Put
from lunastor.common.etcd.cache import PrefixCache
from lunastor.common.events import EVENTS
from lunastor.common.records import Keys, LocalityClaim, RecordError

log = logging.getLogger(__name__)

CLAIMS = Counter("lunastor_locality_claims_total", "Locality claims this access point wrote")
HANDOVERS = Counter(
    "lunastor_locality_handovers_total", "Extents whose primary this server handed to a claimant"
)

MAX_CLAIMS_PER_PASS = 64


class LocalityAborted(Exception):
    """The hand-over did not happen (the extent changed, a member refused): nothing changed
    in etcd; the next repair pass looks again."""


class Activity:
    """IOs per extent through this access point since the last claim pass."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}

    def note(self, volume: str, index: int) -> None:
        key = (volume, index)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1

    def take(self) -> dict[tuple[str, int], int]:
        out, self.counts = self.counts, {}
        return out


def read_claims(cache: PrefixCache) -> dict[tuple[str, int], LocalityClaim]:
    """The claims in a watched copy of `Keys.LOCALITY` (undecodable ones left out)."""
    out = {}
    for kv in cache.items.values():
        try:
            claim = LocalityClaim.from_json(kv.value)
        except RecordError:
            continue
        out[(claim.volume, claim.index)] = claim
    return out


class Claimer:
    """Writes this access point's claims from its `Activity` (one window per pass)."""

    def __init__(
        self,
        etcd: Etcd,
        emap: ExtentMap,
        me: str,
        activity: Activity,
        claims: PrefixCache,
        policy: ClaimPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.etcd = etcd
        self.emap = emap
        self.me = me
        self.activity = activity
        self.claims = claims
        self.policy = policy or ClaimPolicy()
        self.clock = clock
        self._window = time.monotonic()  # when the current activity window began

    async def run_once(self) -> list[LocalityClaim]:
        """Write the claims the last window calls for; returns those written."""
        window = self.activity.take()
        began, self._window = self._window, time.monotonic()
        seconds = max(self._window - began, 1e-3)
        busiest = sorted(window.items(), key=lambda kv: -kv[1])[:MAX_CLAIMS_PER_PASS]
        now = self.clock()
        written = []
        for (volume, index), ios in busiest:
            rec = self.emap.get(volume, index)
            if rec is None or not rec.replicas:
                continue
            key = Keys.locality_claim(volume, index)
            kv = self.claims.get(key)
            existing = None
            if kv is not None:
                try:
                    existing = LocalityClaim.from_json(kv.value)
                except RecordError:
                    existing = None  # replaced below
            claim = decide_claim(
                self.me, now, ios / seconds, rec.primary, existing, volume, index, self.policy
            )
            if claim is None:
                continue
            if kv is not None:
                guard = Compare.mod_revision(key) == kv.mod_revision
            else:
                guard = Compare.version(key) == 0
            done = await self.etcd.txn([guard], [Put(key, claim.to_json())])
            if done.succeeded:
                CLAIMS.inc()
                written.append(claim)
                log.info(
                    "extent %s/%d: claimed for locality (%.0f IO/s; hold %.0f s, %d contests)",
                    volume,
                    index,
                    ios / seconds,
                    claim.hold,
                    claim.contests,
                )
        return written


def _left_ahead(volume: str, index: int, gen: int, members: list[str], why: str) -> None:
    """A hand-over stopped after some members adopted its gen + 1 and before its commit: they
    refuse the map's generation until the extent's primary converges them past it (node.py,
    `_ahead_of_map`, `_diverged`; docs/faults.md)."""
    if members:
        log.warning(
            "extent %s/%d: hand-over stopped before its commit (%s); %s left at gen %d",
            volume,
            index,
            why,
            ", ".join(members),
            gen,
        )


async def hand_over(node: DataNode, volume: str, index: int, target: str) -> int:
    """Make member `target` the extent's primary (we are its primary); returns the new gen."""
    pe = await node.lead(volume, index)
    if target not in pe.members[1:]:
        raise LocalityAborted(f"{target} is not a secondary of {volume}/{index}")
    # A member that cannot adopt gen + 1 would leave the others ahead of the map, and they
    # would refuse our next forward: no hand-over while one is down (a whole-cluster stop
    # leaves the last servers their extents; docs/faults.md, "Planned restarts").
    down = [m for m in pe.members[1:] if not node.emap.is_live(m) or node.away(m)]
    if down:
        raise LocalityAborted(f"{', '.join(down)} not live or not serving yet")
    async with pe.lock:
        await pe.idle.wait()  # every forward settled: every member applied every seq
        if pe.joining is not None:
            raise LocalityAborted(f"{pe.joining} is joining {volume}/{index}")
        entry = await node.emap.fresh(volume, index)
        if entry is None or entry.record.gen != pe.gen or entry.record.replicas != pe.members:
            raise LocalityAborted(f"extent {volume}/{index} changed")
        gen = pe.gen + 1
        # Everyone adopts gen + 1 before the commit (as a drain's hand-over does): the new
        # primary's first forward must find no member at the old generation, and we hold
        # the lock, so no write of ours meets them in between.
        adopted: list[str] = []
        for m in pe.members[1:]:
            try:
                resp = await node.replicas.call(
                    m, partial(SetGen, volume=volume, extent=index, gen=gen)
                )
            except PeerError as exc:
                _left_ahead(volume, index, gen, adopted, f"{m}: {exc}")
                raise LocalityAborted(f"{m}: {exc}") from None
            if not resp.ok:
                _left_ahead(volume, index, gen, adopted, f"{m} refused: {resp.status}")
                raise LocalityAborted(f"{m} refused gen {gen}: {resp.status}")
            adopted.append(m)
        await pe.replica.set_generation(gen)
        members = [target, *(m for m in pe.members if m != target)]
        new = dataclasses.replace(entry.record, gen=gen, replicas=members, converging=False)
        try:
            committed = await node.emap.replace(entry, new)
        except EtcdError as exc:
            # (a whole-cluster `docker compose restart` stops etcd with the chunk servers)
            _left_ahead(volume, index, gen, [node.node_id, *adopted], f"commit: {exc}")
            raise
        # Either way we no longer order writes of this extent: committed, the target does;
        # not (someone else changed the extent meanwhile), the map has moved past `gen - 1`.
        pe.gen, pe.members = gen, []
        node.forget(pe)
        if committed is None:
            raise LocalityAborted(f"extent {volume}/{index} changed during the hand-over")
    HANDOVERS.inc()
    EVENTS.emit("locality_handover", f"{volume}/{index}", f"{node.node_id} -> {target}, gen {gen}")
    log.warning("extent %s/%d: primary handed to %s (gen %d)", volume, index, target, gen)
    return gen
