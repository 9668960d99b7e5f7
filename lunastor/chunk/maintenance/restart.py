"""Planned restarts: which chunk servers are away on purpose and expected back, and the
clean stop that leaves that behind (docs/faults.md, "Planned restarts").

A server is *expected back* (`Returns.until`) while

* its `PlannedStop` record (`Keys.planned_stop`) holds: written by the server when it stops
  cleanly (SIGTERM), before its live record goes, and when it starts, before its data path
  serves; deleted once it serves again; ignored once its `until` (wall clock) passed; or
* it was already missing when this server started, for `grace` seconds from our start (a
  whole cluster coming back after a crash: the servers come up seconds apart, and the first
  ones up must not fail over the extents of the others).

While a member is expected back, the others wait for it instead of leaving it out: the repair
plan does not fail its extents over nor remove it (repair_plan.py), an access point waits for
it before promoting another member (`AccessPath.failover`), and a primary refuses writes
(retried by the access point) rather than remove it (`DataNode`).

`stop_cleanly` is the stopping server's part: the record first, then every extent it is the
primary of handed to a live member at a clean point (`locality.hand_over`), then its live
record deleted so that nobody forwards to it any more, then a short drain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from lunastor.chunk.maintenance.locality import LocalityAborted, hand_over
from lunastor.chunk.replication.extentmap import ExtentMap
from lunastor.chunk.replication.node import DataNode, StaleMap, Unavailable
from lunastor.chunk.store import ExtentStoreError
from lunastor.chunk.wire.peer import PeerError
from lunastor.common.etcd import Etcd, EtcdError
from lunastor.common.etcd.cache import PrefixCache
from lunastor.common.records import Keys, PlannedStop, RecordError

log = logging.getLogger(__name__)

HANDOVER_CONCURRENCY = 8
HANDOVER_BUDGET = 5.0  # seconds a clean stop spends handing extents over (a supervisor waits 10)
DRAIN = 0.5  # seconds the data port stays open after the live record went: forwards in flight


class Returns:
    """Which chunk servers are away on purpose and expected back, and until when."""

    def __init__(
        self,
        etcd: Etcd,
        emap: ExtentMap,
        me: str,
        *,
        grace: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        lead: bool = True,
    ) -> None:
        """`lead`: this process speaks for the server (worker 0 of a server of several
        workers, chunk/workers.py): only it writes and deletes our record and live record."""
        self.etcd = etcd
        self.lead = lead
        self.emap = emap
        self.me = me
        self.grace = grace
        self.clock = clock
        self.wall = wall
        self.records = PrefixCache(etcd, Keys.PLANNED_STOPS)
        self.started = clock()
        # missing when we started and not seen live since: the start-up grace's servers
        self.missing_at_start: set[str] = set()

    async def start(self) -> Returns:
        """Say we are starting (expected back until our data path serves), and note who was
        missing when we started. The extent map must be started."""
        await self.mark("starting")
        await self.records.start()
        self.started = self.clock()
        live = {kv.key.removeprefix(Keys.LIVE_CHUNKS) for kv in self.emap.live.items.values()}
        known = {kv.key.removeprefix(Keys.CHUNKS) for kv in self.emap.chunks.items.values()}
        self.missing_at_start = known - live - {self.me}
        # One that comes up and dies again is a crash like any other: told by its live record
        # vanishing, and not only when `until` is asked while it is live (nobody asks about a
        # member that serves; a victim killed within the grace was waited for ~30 s)
        self.emap.on_gone.append(self.missing_at_start.discard)
        if self.missing_at_start:
            log.warning(
                "chunk servers missing at start, waited for up to %.0f s: %s",
                self.grace,
                ", ".join(sorted(self.missing_at_start)),
            )
        return self

    async def stop(self) -> None:
        await self.records.stop()

    def record(self, chunk_id: str) -> PlannedStop | None:
        kv = self.records.get(Keys.planned_stop(chunk_id))
        if kv is None:
            return None
        try:
            return PlannedStop.from_json(kv.value)
        except RecordError:
            return None

    def until(self, chunk_id: str) -> float:
        """Until when (`clock`) `chunk_id` is expected back; 0.0 when it is not (it is
        ready, or dead for all we know)."""
        now = self.clock()
        rec = self.record(chunk_id)
        if rec is not None and rec.until > self.wall():
            return now + (rec.until - self.wall())
        if chunk_id in self.missing_at_start and now < self.started + self.grace:
            if not self.emap.is_live(chunk_id):
                return self.started + self.grace
            # back: from now on its death is a crash like any other, not a late start
            self.missing_at_start.discard(chunk_id)
        return 0.0

    def expected(self, chunk_id: str) -> bool:
        return self.until(chunk_id) > self.clock()

    async def mark(self, reason: str) -> None:
        """Write our record: we are away on purpose, back within `grace`."""
        if self.lead:
            await mark(self.etcd, self.me, reason, self.grace, self.wall())

    async def ready(self) -> None:
        """Our data path serves: nobody needs to wait for us any more."""
        if self.lead:
            await self.etcd.delete(Keys.planned_stop(self.me))


async def mark(etcd: Etcd, me: str, reason: str, grace: float, now: float) -> None:
    """Write `me`'s PlannedStop record. A server starting writes it before its live record
    appears (chunk/main.py): live and not serving yet, it is waited for, not removed."""
    rec = PlannedStop(id=me, reason=reason, at=now, until=now + grace)
    await etcd.put(Keys.planned_stop(me), rec.to_json())


async def stop_cleanly(
    returns: Returns, node: DataNode, emap: ExtentMap, *, budget: float = HANDOVER_BUDGET
) -> tuple[int, int]:
    """The stopping server's part of a planned restart (see the module's docstring); returns
    (extents handed over, extents kept). Errors are logged: a stop always goes on."""
    me = returns.me
    try:
        await returns.mark("stopping")
    except EtcdError as exc:
        log.warning("planned stop not recorded: %s", exc)
    mine = [
        rec
        for rec in (emap.get(v, i) for v, i in emap.ids())
        if rec is not None
        and rec.primary == me
        and not rec.converging
        and len(rec.replicas) > 1
        and node.store.owns(rec.volume, rec.index)  # a worker hands over its own
    ]
    slots = asyncio.Semaphore(HANDOVER_CONCURRENCY)
    handed = 0
    # no new hand-over starts after the budget; one under way is never cut short (members
    # left at gen + 1 under a map at gen would refuse our forwards after the restart)
    deadline = time.monotonic() + budget

    async def one(volume: str, index: int, members: list[str]) -> None:
        nonlocal handed
        if not all(emap.is_live(m) and not returns.expected(m) for m in members[1:]):
            return  # a member is away too: we keep it, the others wait for us
        target = next((m for m in members[1:] if not emap.draining(m)), None)
        if target is None:
            return
        async with slots:
            if time.monotonic() > deadline:
                return
            try:
                await hand_over(node, volume, index, target)
                handed += 1
            except (
                LocalityAborted,
                Unavailable,
                StaleMap,
                PeerError,
                ExtentStoreError,
                EtcdError,
            ) as exc:
                log.warning("extent %s/%d kept at stop: %s", volume, index, exc)

    results = await asyncio.gather(
        *(one(r.volume, r.index, list(r.replicas)) for r in mine), return_exceptions=True
    )
    for result in results:
        if isinstance(result, Exception):
            log.warning("hand-over at stop failed: %r", result)
    if returns.lead:
        try:
            # nobody forwards to us or routes to us from now on; the lease itself goes last
            await emap.etcd.delete(Keys.live_chunk(me))
        except EtcdError as exc:
            log.warning("live record not deleted at stop: %s", exc)
        await asyncio.sleep(DRAIN)
    kept = len(mine) - handed
    log.warning("clean stop: %d extents handed over, %d kept (expected back)", handed, kept)
    return handed, kept
