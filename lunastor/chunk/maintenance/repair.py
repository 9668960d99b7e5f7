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
from collections.abc import Callable
from functools import partial

from lunastor.chunk.access.volume import AccessPath
from lunastor.chunk.maintenance.repair_plan import (
    Action,
    ActionKind,
    ServerView,
    plan,
    plan_extent,
    wanted_replicas,
)
from lunastor.chunk.replication.extentmap import AllocationError, ExtentMap
from lunastor.chunk.replication.join import JoinAborted, Throttle, join_member, retire_member
from lunastor.chunk.replication.node import DataNode, PrimaryReplicaLost, StaleMap, Unavailable
from lunastor.chunk.store import ExtentStoreError, ReplicaNotFound
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
    RecordError,
    VolumeRecord,
)

log = logging.getLogger(__name__)

DRAIN_STATES = ("draining", "drained")


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
    ) -> None:
        self.emap = emap
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
        self.admin = emap.admin
        self._down_since: dict[str, float] = {}
        self._busy: set[tuple[str, int]] = set()
        self._task: asyncio.Task[None] | None = None
        self.last: list[Action] = []  # the last pass's plan (every extent, every actor)

    async def start(self, loop_forever: bool = True) -> Repairer:
        await self.volumes.start()
        await self.moves.start()
        if loop_forever:
            self._task = asyncio.create_task(self._run(), name="repair")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
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
        for kv in self.emap.chunks.items.values():
            with contextlib.suppress(RecordError):
                info = ChunkServerInfo.from_json(kv.value)
                zones[info.id] = info.zone or "default"
        for kv in self.emap.live.items.values():
            with contextlib.suppress(RecordError):
                st = ChunkServerStatus.from_json(kv.value)
                live[st.id] = st
                zones[st.id] = st.zone or "default"
        draining = set()
        for kv in self.admin.items.values():
            with contextlib.suppress(RecordError):
                admin = ChunkAdminRecord.from_json(kv.value)
                if admin.state in DRAIN_STATES:
                    draining.add(admin.id)
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
            )
        return out

    def extents(self) -> list[ExtentRecord]:
        out = []
        for volume, index in self.emap.ids():
            rec = self.emap.get(volume, index)
            if rec is not None:
                out.append(rec)
        return out

    def desired(self) -> dict[str, int]:
        out = {}
        for kv in self.volumes.items.values():
            with contextlib.suppress(RecordError):
                vol = VolumeRecord.from_json(kv.value)
                out[vol.id] = vol.replicas
        return out

    def rebalance_moves(self) -> dict[tuple[str, int], tuple[str, str]]:
        """Meta's moves: (volume, index) -> (source, target)."""
        out = {}
        for kv in self.moves.items.values():
            with contextlib.suppress(RecordError):
                move = MoveRecord.from_json(kv.value)
                out[(move.volume, move.index)] = (move.source, move.target)
        return out

    async def _placement(self, rec: ExtentRecord, replicas: int) -> list[str]:
        try:
            return (await self.emap.ring(replicas)).place(rec.volume, rec.index)
        except AllocationError:
            return []

    async def _old_holders(self, rec: ExtentRecord, servers: dict[str, ServerView]) -> set[str]:
        """Live servers that are not members but still hold a replica file of the extent."""
        out = set()
        for s in servers.values():
            if not s.live or s.draining or s.id in rec.replicas:
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
        desired = self.desired()
        extents = self.extents()
        actions = plan(
            extents,
            servers,
            desired,
            replace_after=self.replace_after,
            moves=self.rebalance_moves(),
        )
        by_key = {(r.volume, r.index): r for r in extents}
        mine = []
        for act in actions:
            if act.actor != self.me or not act.kind.acts:
                continue
            if act.kind is ActionKind.ADD:
                # refine the target: a catch-up candidate, ring order
                rec = by_key[(act.volume, act.index)]
                want = wanted_replicas(desired, rec.volume) or len(rec.replicas)
                refined = plan_extent(
                    rec,
                    servers,
                    want,
                    replace_after=self.replace_after,
                    placement=await self._placement(rec, want),
                    old_holders=await self._old_holders(rec, servers),
                )
                if refined is None or refined.kind is not ActionKind.ADD:
                    continue
                act = refined
            mine.append(act)
        self.last = actions
        lost = await self._lost_primaries(extents)
        await asyncio.gather(
            *(self._apply(a) for a in mine), *(self._hand_over_lost(rec) for rec in lost)
        )
        return actions

    # -- a primary whose replica is gone (a wiped or replaced disk) -------------------------

    async def _lost_primaries(self, extents: list[ExtentRecord]) -> list[ExtentRecord]:
        """Extents we are primary of, not open here, whose replica file is missing."""
        out = []
        for rec in extents:
            if rec.primary != self.me or rec.converging or len(rec.replicas) < 2:
                continue
            if self.node.leading(rec.volume, rec.index):
                continue
            try:
                await self.node.store.open(rec.volume, rec.index)
            except ReplicaNotFound:
                out.append(rec)
            except ExtentStoreError:
                continue
        return out

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
            await self.path.converge(committed)
        except (Unavailable, StaleMap, PeerError, ExtentStoreError, EtcdError, TimeoutError) as exc:
            log.warning("hand-over of %s/%d (replica lost) failed: %s", *key, exc)
        finally:
            self._busy.discard(key)

    async def _apply(self, act: Action) -> None:
        key = (act.volume, act.index)
        if key in self._busy:
            return
        self._busy.add(key)
        try:
            async with self.slots:
                await self._do(act)
        except (JoinAborted, Unavailable, StaleMap, PeerError, ExtentStoreError) as exc:
            log.warning("%s of %s/%d (%s) failed: %s", act.kind, *key, act.member, exc)
        except (EtcdError, TimeoutError) as exc:
            log.warning("%s of %s/%d: etcd: %s", act.kind, *key, exc)
        except Exception:  # a bug in one action must not stop the others
            log.exception("%s of %s/%d (%s) failed", act.kind, *key, act.member)
        finally:
            self._busy.discard(key)

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
            await self.node.remove_members(pe, [act.member])
        elif act.kind in (ActionKind.ADD, ActionKind.REBALANCE_ADD):
            await join_member(self.node, act.volume, act.index, act.member, self.throttle)
        elif act.kind in (ActionKind.REMOVE_EXTRA, ActionKind.REBALANCE_RETIRE):
            await retire_member(self.node, act.volume, act.index, act.member)
