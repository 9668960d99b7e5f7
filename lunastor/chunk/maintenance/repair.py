"""The chunk server's repair loop: every `repair_interval`, plan each extent's replica set
(`repair_plan.plan`) and apply the actions this server is the actor of: failover for extents
whose primary died (as their first live member), and for extents it is primary of: removing
dead members, joining new or returning ones (join.py, throttled by `rebuild_rate`, at most
`rebuild_concurrency` at once), retiring drained ones and carrying out meta's rebalancing
moves (join the target, then retire the source). docs/datapath.md, "Rebuild,
catch-up and drain". `run_once()` runs one pass (tests call it instead of waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from lunastor.chunk.access.volume import AccessPath
from lunastor.chunk.maintenance.locality import (
    Claimer,
    LocalityAborted,
    hand_over,
    read_claims,
)
from lunastor.chunk.maintenance.locality_plan import ClaimPolicy
from lunastor.chunk.maintenance.repair_plan import (
    Action,
    ActionKind,
    ServerView,
    plan,
    plan_extent,
)
from lunastor.chunk.maintenance.restart import Returns
from lunastor.chunk.replication.extentmap import AllocationError, ExtentMap
from lunastor.chunk.replication.join import JoinAborted, Throttle, join_member, retire_member
from lunastor.chunk.replication.node import DataNode, PrimaryReplicaLost, StaleMap, Unavailable
from lunastor.chunk.store import ExtentStoreError, ReplicaNotFound, ReplicaState
from lunastor.chunk.wire.messages import GetState
from lunastor.chunk.wire.peer import PeerError
from lunastor.common.etcd import Etcd, EtcdError
from lunastor.common.etcd.cache import PrefixCache
from lunastor.common.records import (
    ChunkAdminRecord,
    ChunkServerInfo,
    ChunkServerStatus,
    ExtentRecord,
    Keys,
    MoveRecord,
    VolumeRecord,
    decode_records,
    of_volume,
)

log = logging.getLogger(__name__)

DRAIN_STATES = ("draining", "drained")
LOCALITY_MAX_BACKOFF = 300.0  # seconds between attempts of a locality action that keeps failing


class Repairer:
    def __init__(
        self,
        etcd: Etcd,
        emap: ExtentMap,
        node: DataNode,
        path: AccessPath,
        *,
        replace_after: float,
        rebuild_rate: int,
        concurrency: int,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        locality: ClaimPolicy | None = None,
        returns: Returns | None = None,
    ) -> None:
        self.emap = emap
        self.returns = returns  # servers away on purpose, expected back (restart.py)
        self.node = node
        self.path = path
        self.me = node.node_id
        self.replace_after = replace_after
        self.interval = interval
        self.clock = clock
        self.throttle = Throttle(rebuild_rate)
        self.slots = asyncio.Semaphore(concurrency)
        self.volumes = PrefixCache(etcd, Keys.VOLUMES)
        self.moves = PrefixCache(etcd, Keys.REBALANCE)  # meta's rebalancing moves
        # locality (locality.py): access points' claims; ours written from our activity
        self.claims = PrefixCache(etcd, Keys.LOCALITY)
        self.claimer: Claimer | None = None
        if locality is not None:
            self.claimer = Claimer(etcd, emap, self.me, path.activity, self.claims, locality)
        self._backoff: dict[tuple[str, int], tuple[float, float]] = {}  # until, delay
        self.admin = emap.admin
        self._down_since: dict[str, float] = {}
        self._busy: set[tuple[str, int]] = set()
        self._task: asyncio.Task[None] | None = None
        self.last: list[Action] = []  # the last pass's plan (every extent, every actor)

    async def start(self, loop_forever: bool = True) -> Repairer:
        await self.volumes.start()
        await self.moves.start()
        await self.claims.start()
        if loop_forever:
            self._task = asyncio.create_task(self._run(), name="repair")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.claims.stop()
        await self.moves.stop()
        await self.volumes.stop()

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except (EtcdError, AllocationError) as exc:
                log.warning("repair pass failed: %s", exc)
            except Exception:  # a bug must not end the loop for good
                log.exception("repair pass failed")
            await asyncio.sleep(self.interval)

    # -- inputs ----------------------------------------------------------------------------

    def servers(self) -> dict[str, ServerView]:
        now = self.clock()
        zones: dict[str, str] = {}
        live: dict[str, ChunkServerStatus] = {}
        for info in decode_records(self.emap.chunks.items.values(), ChunkServerInfo):
            zones[info.id] = info.zone or "default"
        for st in decode_records(self.emap.live.items.values(), ChunkServerStatus):
            live[st.id] = st
            zones[st.id] = st.zone or "default"
        draining = {
            admin.id
            for admin in decode_records(self.admin.items.values(), ChunkAdminRecord)
            if admin.state in DRAIN_STATES
        }
        out = {}
        for cid, zone in zones.items():
            status = live.get(cid)
            if status is not None:
                self._down_since.pop(cid, None)
            since = self._down_since.setdefault(cid, now) if status is None else now
            out[cid] = ServerView(
                cid,
                zone,
                live=status is not None,
                draining=cid in draining or (status is not None and status.state == "draining"),
                down_for=now - since,
                expected=self.returns is not None and self.returns.expected(cid),
            )
        return out

    def extents(self) -> list[ExtentRecord]:
        out = []
        owns = self.node.store.owns  # a server's workers each repair their own (workers.py)
        for volume, index in self.emap.ids():
            if not owns(volume, index):
                continue
            rec = self.emap.get(volume, index)
            if rec is not None:
                out.append(rec)
        return out

    def desired(self) -> tuple[dict[str, int], dict[str, list[str]]]:
        """Each volume's replica count, and the zones it is restricted to (if any)."""
        replicas, zones = {}, {}
        for vol in decode_records(self.volumes.items.values(), VolumeRecord):
            replicas[vol.id] = vol.replicas
            if vol.zones:
                zones[vol.id] = vol.zones
        return replicas, zones

    def rebalance_moves(self) -> dict[tuple[str, int], tuple[str, str]]:
        """Meta's moves: (volume, index) -> (source, target)."""
        moves = decode_records(self.moves.items.values(), MoveRecord)
        return {(m.volume, m.index): (m.source, m.target) for m in moves}

    async def _placement(self, rec: ExtentRecord, replicas: int) -> list[str]:
        try:
            return (await self.emap.ring(replicas)).place(rec.volume, rec.index)
        except AllocationError:
            return []

    async def _old_holders(self, rec: ExtentRecord, servers: dict[str, ServerView]) -> set[str]:
        """Servers that can take a replica (`takes_replicas`: the only ones `choose_target`
        picks), not members, that still hold a replica file of the extent."""
        out = set()
        for s in servers.values():
            if not s.takes_replicas or s.id in rec.replicas:
                continue
            build = partial(GetState, volume=rec.volume, extent=rec.index)
            try:
                st = await self.node.replicas.call(s.id, build)
            except PeerError:
                continue
            if st.ok:
                out.add(s.id)
        return out

    # -- one pass --------------------------------------------------------------------------

    async def run_once(self) -> list[Action]:
        """Plan every extent; apply (and wait for) the actions this server is the actor of."""
        servers = self.servers()
        desired, zones = self.desired()
        extents = self.extents()
        claims = await self._locality()
        actions = plan(
            extents,
            servers,
            desired,
            replace_after=self.replace_after,
            moves=self.rebalance_moves(),
            zones=zones,
            claims=claims,
            min_replicas=self.node.min_replicas,
        )
        by_key = {(r.volume, r.index): r for r in extents}
        mine = []
        now = self.clock()
        for act in actions:
            if act.actor != self.me or not act.kind.acts:
                continue
            if act.kind.locality and self._backoff.get((act.volume, act.index), (0.0,))[0] > now:
                continue  # a locality action failed here lately: wait before trying again
            if act.kind is ActionKind.ADD:
                # refine the target: a catch-up candidate, ring order
                rec = by_key[(act.volume, act.index)]
                want = of_volume(desired, rec.volume) or len(rec.replicas)
                refined = plan_extent(
                    rec,
                    servers,
                    want,
                    replace_after=self.replace_after,
                    placement=await self._placement(rec, want),
                    old_holders=await self._old_holders(rec, servers),
                    allowed_zones=of_volume(zones, rec.volume) or (),
                    min_replicas=self.node.min_replicas,
                )
                if refined is None or refined.kind is not ActionKind.ADD:
                    continue
                act = refined
            mine.append(act)
        self.last = actions
        lost, stale, unsettled = await self._lost_primaries(extents)
        await asyncio.gather(
            *(self._apply(a) for a in mine),
            *(self._hand_over_lost(rec) for rec in lost),
            *(self._recover_stale(rec) for rec in stale),
            *(self._settle(rec) for rec in unsettled),
        )
        return actions

    # -- locality ---------------------------------------------------------------------------

    async def _locality(self) -> dict[tuple[str, int], str]:
        """Write our claims (if locality is on), then every claim as (volume, index) ->
        claimant. Locality errors never stop the pass: they cost the claims only."""
        if self.claimer is None:
            return {}
        try:
            await self.claimer.run_once()
        except Exception as exc:
            log.warning("locality claims not written: %s", exc)
        try:
            return {key: claim.chunk for key, claim in read_claims(self.claims).items()}
        except Exception as exc:
            log.warning("locality claims not read: %s", exc)
            return {}

    def _locality_failed(self, key: tuple[str, int]) -> None:
        _, delay = self._backoff.get(key, (0.0, self.interval))
        delay = min(delay * 2, LOCALITY_MAX_BACKOFF)
        self._backoff[key] = (self.clock() + delay, delay)

    # -- a primary whose replica is gone (a wiped or replaced disk) -------------------------

    async def _lost_primaries(
        self, extents: list[ExtentRecord]
    ) -> tuple[list[ExtentRecord], list[ExtentRecord], list[ExtentRecord]]:
        """Extents we are primary of, not open here, whose replica file is missing; those
        whose replica lost its page cache (STALE after a power loss); and those whose replica
        is not at the map's generation (`_settle`)."""
        lost, stale, unsettled = [], [], []
        for rec in extents:
            if rec.primary != self.me or rec.converging or len(rec.replicas) < 2:
                continue
            if self.node.leading(rec.volume, rec.index):
                continue
            try:
                replica = await self.node.store.open(rec.volume, rec.index)
            except ReplicaNotFound:
                lost.append(rec)
                continue
            except ExtentStoreError:
                continue
            if replica.state == ReplicaState.STALE:
                stale.append(rec)
            elif replica.generation != rec.gen:
                unsettled.append(rec)
        return lost, stale, unsettled

    async def _settle(self, rec: ExtentRecord) -> None:
        """Our replica is not at the map's generation: a change was cut short by a stop (a
        hand-over's gen + 1 never committed, a join's gen + 1 committed but not pushed: a
        whole-cluster `docker compose restart` stops etcd with the chunk servers). Reads
        need no primary state, so no write may come to set it up, and every replica at
        another generation refuses the map's: set it up now (`DataNode._become_primary`
        adopts the map's generation, or converges the members past an uncommitted one)."""
        await self._once(rec, self.node.lead(rec.volume, rec.index), log.info, "setting up")

    async def _recover_stale(self, rec: ExtentRecord) -> None:
        """Our replica lost its page cache (a power loss): the most advanced member resumes
        and the others converge from it (`AccessPath.recover`, docs/faults.md)."""
        await self._once(
            rec,
            self.path.recover(rec.volume, rec.index),
            log.warning,
            "resuming after a lost page cache",
        )

    async def _once(
        self,
        rec: ExtentRecord,
        work: Coroutine[Any, Any, object],
        report: Callable[..., object],
        what: str,
    ) -> None:
        """Run `work` for the extent unless a pass already does; a failure is reported, and
        the next pass tries again."""
        key = (rec.volume, rec.index)
        if key in self._busy:
            work.close()
            return
        self._busy.add(key)
        try:
            await work
        except (Unavailable, StaleMap, PeerError, ExtentStoreError, EtcdError, TimeoutError) as exc:
            report("%s %s/%d: %s", what, *key, exc)
        finally:
            self._busy.discard(key)

    async def _hand_over_lost(self, rec: ExtentRecord) -> None:
        """Our replica is gone while the others hold the data: the most advanced current
        secondary becomes primary by transaction (`converging`, as after a failover: nothing
        was acknowledged that is not on every member), and converges the others. We are no
        longer a member; the repair adds a replica back (possibly on us, copied in full)."""
        key = (rec.volume, rec.index)
        if key in self._busy:
            return
        self._busy.add(key)
        try:
            try:
                await self.node.lead(rec.volume, rec.index)
                return  # it was not lost after all (never written: created empty)
            except PrimaryReplicaLost:
                pass
            entry = await self.emap.fresh(rec.volume, rec.index)
            if entry is None or entry.record != rec:
                return
            states: dict[str, int] = {}
            for member in rec.replicas[1:]:
                try:
                    st = await self.path.get_state(member, rec.volume, rec.index, False)
                except PeerError:
                    continue
                if st.ok and st.fields["gen"] == rec.gen and st.fields["state"] == 0:
                    states[member] = st.fields["applied_seq"]
            if not states:
                log.error("extent %s/%d: our replica is lost and no member is current", *key)
                return
            order = [m for m in rec.replicas if m in states]
            best = max(order, key=lambda m: (states[m], -order.index(m)))
            new = dataclasses.replace(
                rec,
                gen=rec.gen + 1,
                replicas=[best] + [m for m in order if m != best],
                converging=True,
            )
            committed = await self.emap.replace(entry, new)
            if committed is None:
                return
            log.warning(
                "extent %s/%d: our replica is lost; %s is primary now (gen %d)", *key, best, new.gen
            )
            await self.path.converge(committed, own=True)
        except (Unavailable, StaleMap, PeerError, ExtentStoreError, EtcdError, TimeoutError) as exc:
            log.warning("hand-over of %s/%d (replica lost) failed: %s", *key, exc)
        finally:
            self._busy.discard(key)

    async def _apply(self, act: Action) -> None:
        key = (act.volume, act.index)
        if key in self._busy:
            return
        self._busy.add(key)
        ok = False
        try:
            async with self.slots:
                await self._do(act)
            ok = True
        except (
            JoinAborted,
            LocalityAborted,
            Unavailable,
            StaleMap,
            PeerError,
            ExtentStoreError,
        ) as exc:
            log.warning("%s of %s/%d (%s) failed: %s", act.kind, *key, act.member, exc)
        except (EtcdError, TimeoutError) as exc:
            log.warning("%s of %s/%d: etcd: %s", act.kind, *key, exc)
        except Exception:  # a bug in one action must not stop the others
            log.exception("%s of %s/%d (%s) failed", act.kind, *key, act.member)
        finally:
            self._busy.discard(key)
            if act.kind.locality:
                if ok:
                    self._backoff.pop(key, None)
                else:
                    self._locality_failed(key)

    async def _do(self, act: Action) -> None:
        if act.kind is ActionKind.FAILOVER:
            entry = self.emap.entry(act.volume, act.index)
            if entry is None:
                return
            if entry.record.converging:
                await self.path.converge(entry)
            else:
                await self.path.failover(entry)
        elif act.kind is ActionKind.REMOVE_DEAD:
            pe = await self.node.lead(act.volume, act.index)
            await self.node.remove_members(pe, [act.member], "not live for too long")
        elif act.kind is ActionKind.LOCALITY_HANDOVER:
            await hand_over(self.node, act.volume, act.index, act.member)
        elif act.kind in (ActionKind.ADD, ActionKind.REBALANCE_ADD, ActionKind.LOCALITY_ADD):
            await join_member(self.node, act.volume, act.index, act.member, self.throttle)
        elif act.kind in (
            ActionKind.REMOVE_EXTRA,
            ActionKind.REBALANCE_RETIRE,
            ActionKind.LOCALITY_RETIRE,
        ):
            await retire_member(self.node, act.volume, act.index, act.member, str(act.kind))
