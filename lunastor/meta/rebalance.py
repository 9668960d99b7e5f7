"""The planner leader's placement jobs (docs/placement.md, "Ring rebuilds" and "Rebalancing").

- `RingPlanner`: when chunk servers join, leave, drain or change capacity, rebuild each stored
  ring (`/v1/rings/<replicas>`) with `build_ring(..., previous=stored)`, which moves as little
  as the new server set allows, and store it by a transaction on its mod_revision
  (`Ring.version` + 1). New extents are then placed on the new servers.
- `RebalancePlanner`: moves existing replicas until every server holds its fair share
  (`rebalance_plan.plan_moves`). Each move is an intent `/v1/rebalance/<vol>/<index>` that the
  extent's primary carries out (join the target, then retire the source: the repair loop,
  chunk/maintenance/repair.py); the planner deletes intents that are done or can no longer
  be done, throttles how many are outstanding, and reports one `rebalance` operation with
  progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lunastor.common.etcd import Compare, Delete, Etcd, KeyValue, Put
from lunastor.common.extent_pages import extent_records
from lunastor.common.logs import get_logger
from lunastor.common.records import (
    ChunkAdminRecord,
    ChunkServerInfo,
    ChunkServerStatus,
    ExtentRecord,
    Keys,
    LocalityClaim,
    MoveRecord,
    OperationRecord,
    RecordError,
    decode_records,
)
from lunastor.common.ring import Candidate, PlacementError, Ring
from lunastor.meta.placement import build_ring
from lunastor.meta.planners import records_with_extents
from lunastor.meta.rebalance_plan import Holder, Move, RebalancePlan, plan_moves
from lunastor.meta.store import new_id

log = get_logger(component="rebalance")

REBALANCE_KIND = "rebalance"
REBALANCE_SUBJECT = "cluster"


@dataclass(frozen=True)
class ServerCensus:
    """The chunk servers as placement sees them, from one read of etcd."""

    candidates: list[Candidate]  # every registered server: up, draining or down

    @classmethod
    async def read(cls, etcd: Etcd) -> ServerCensus:
        chunks, rev = await etcd.get_prefix(Keys.CHUNKS)
        lives, _ = await etcd.get_prefix(Keys.LIVE_CHUNKS, revision=rev)
        admins, _ = await etcd.get_prefix(Keys.CHUNK_ADMIN, revision=rev)
        live = {s.id: s for s in decode_records(lives, ChunkServerStatus)}
        draining = {a.id for a in decode_records(admins, ChunkAdminRecord)}
        cands = []
        for info in decode_records(chunks, ChunkServerInfo):
            status = live.get(info.id)
            if status is None:
                cands.append(Candidate(info.id, info.zone or "default", 0, 0, "down"))
                continue
            capacity = max(1, status.capacity)  # placement refuses an up server of size 0
            state = "draining" if info.id in draining or status.state == "draining" else "up"
            free = min(max(0, status.free), capacity)
            cands.append(Candidate(info.id, status.zone or "default", capacity, free, state))
        return cls(sorted(cands, key=lambda c: c.id))

    def holders(self) -> list[Holder]:
        return [Holder(c.id, c.zone, c.capacity, c.state == "up") for c in self.candidates]


def _shape(cands: Sequence[Candidate]) -> set[tuple[str, str, int, str]]:
    """What a rebuild depends on (free space only matters through the nearly-full flag,
    which the builder reads from `free` when it rebuilds anyway)."""
    return {(c.id, c.zone, c.capacity, c.state) for c in cands if c.state != "down"} | {
        (c.id, c.zone, 0, "down") for c in cands if c.state == "down"
    }


class RingPlanner:
    """Rebuilds each stored ring when the chunk servers changed."""

    name = "ring"

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self.written: list[Ring] = []  # the last pass's rebuilt rings

    async def run_once(self) -> None:
        """Rebuild the stored rings whose server set changed (kept in `written`)."""
        census = await ServerCensus.read(self.etcd)
        rings, _ = await self.etcd.get_prefix(Keys.RINGS)
        written = []
        for kv in rings:
            try:
                stored = Ring.from_dict(json.loads(kv.value))
            except (ValueError, PlacementError) as exc:
                log.error("stored ring unusable", key=kv.key, error=str(exc))
                continue
            known = {c.id: c for c in stored.candidates}
            cands = [
                dataclasses.replace(c, capacity=known[c.id].capacity)
                if c.state == "down" and c.id in known
                else c
                for c in census.candidates
            ]
            if _shape(cands) == _shape(stored.candidates):
                continue
            try:
                ring = build_ring(cands, stored.replicas, stored.part_power, previous=stored)
            except PlacementError as exc:
                log.warning("ring not rebuilt", key=kv.key, error=str(exc))
                continue
            done = await self.etcd.txn(
                [Compare.mod_revision(kv.key) == kv.mod_revision],
                [Put(kv.key, json.dumps(ring.to_dict()).encode())],
            )
            if done.succeeded:
                log.info("ring rebuilt", key=kv.key, version=ring.version)
                written.append(ring)
        self.written = written


class RebalancePlanner:
    """Hands out rebalancing moves and follows them (see the module docstring)."""

    name = "rebalance"

    def __init__(self, etcd: Etcd, *, max_moves: int = 16, max_per_server: int = 2) -> None:
        self.etcd = etcd
        self.max_moves = max_moves
        self.max_per_server = max_per_server
        self.last: RebalancePlan | None = None

    async def run_once(self) -> None:
        census = await ServerCensus.read(self.etcd)
        kvs, rev = await self.etcd.get_prefix(Keys.EXTENTS)
        extents = {(e.volume, e.index): e for e in extent_records(kvs)}
        intents, _ = await self.etcd.get_prefix(Keys.REBALANCE, revision=rev)
        volumes = await records_with_extents(self.etcd, extents.values(), rev)
        zones = {v.id: v.zones for v in volumes if v.zones}
        claimed, _ = await self.etcd.get_prefix(Keys.LOCALITY, revision=rev)
        claims = {(c.volume, c.index): c.chunk for c in decode_records(claimed, LocalityClaim)}
        rings: dict[int, Ring] = {}
        for kv in (await self.etcd.get_prefix(Keys.RINGS, revision=rev))[0]:
            with contextlib.suppress(ValueError, PlacementError):
                ring = Ring.from_dict(json.loads(kv.value))
                rings[ring.replicas] = ring
        holders = census.holders()
        usable = {h.id for h in holders if h.usable}
        in_flight: list[Move] = []
        finished: list[KeyValue] = []
        for kv in intents:
            try:
                move = MoveRecord.from_json(kv.value)
            except RecordError:
                finished.append(kv)
                continue
            rec = extents.get((move.volume, move.index))
            if not _pending(rec, move, usable):
                finished.append(kv)
            else:
                in_flight.append(Move(move.volume, move.index, move.source, move.target))
        for kv in finished:
            await self.etcd.txn([Compare.mod_revision(kv.key) == kv.mod_revision], [Delete(kv.key)])

        def placement(volume: str, index: int) -> list[str]:
            rec = extents[(volume, index)]
            ring = rings.get(len(rec.replicas))
            return ring.place(volume, index) if ring is not None else []

        plan = plan_moves(
            extents.values(),
            holders,
            in_flight=in_flight,
            placement=placement,
            max_moves=self.max_moves,
            max_per_server=self.max_per_server,
            claims=claims,
            zones=zones,
        )
        op = await self._operation(plan, len(in_flight))
        now = round(time.time(), 6)
        for m in plan.moves:
            record = MoveRecord(m.volume, m.index, m.source, m.target, op, now)
            await self.etcd.create(Keys.rebalance_move(m.volume, m.index), record.to_json())
        if plan.moves:
            log.info(
                "rebalance moves handed out",
                moves=len(plan.moves),
                in_flight=len(in_flight),
                worst=round(plan.before.worst, 4),
            )
        self.last = plan

    async def _operation(self, plan: RebalancePlan, in_flight: int) -> str:
        """The running `rebalance` operation, created, advanced or completed; its id."""
        ops, _ = await self.etcd.get_prefix(Keys.OPERATIONS)
        found: tuple[OperationRecord, KeyValue] | None = None
        for kv in ops:
            with contextlib.suppress(RecordError):
                op = OperationRecord.from_json(kv.value)
                if op.kind == REBALANCE_KIND and op.state == "running":
                    found = (op, kv)
        # the work left: replicas still above fair share (moves in flight not done yet)
        left = plan.before.excess
        idle = not plan.moves and in_flight == 0
        now = round(time.time(), 6)
        worst = f"worst server {plan.before.worst:.1%} off its fair share"
        if found is None:
            if idle:
                return ""
            op = OperationRecord(
                id=new_id("op"),
                kind=REBALANCE_KIND,
                subject=REBALANCE_SUBJECT,
                created_at=now,
                updated_at=now,
                total=max(1, left),
                detail=f"{left} replicas to move; {worst}",
            )
            await self.etcd.create(Keys.operation(op.id), op.to_json())
            return op.id
        op, kv = found
        total = max(op.total, left, 1)
        if idle:
            new = dataclasses.replace(
                op, state="succeeded", progress=1.0, updated_at=now, total=total, detail=worst
            )
        else:
            progress = round(max(0.0, 1 - left / total), 4)
            if (progress, total) == (op.progress, op.total):
                return op.id
            new = dataclasses.replace(
                op,
                progress=progress,
                total=total,
                updated_at=now,
                detail=f"{left} replicas to move, {in_flight} moving; {worst}",
            )
        await self.etcd.txn(
            [Compare.mod_revision(kv.key) == kv.mod_revision], [Put(kv.key, new.to_json())]
        )
        return op.id


def _pending(rec: ExtentRecord | None, move: MoveRecord, usable: set[str]) -> bool:
    """Whether a handed-out move still has work to do and can still be done."""
    if rec is None or move.target not in usable:
        return False
    if move.target in rec.replicas:
        return move.source in rec.replicas  # joined; the source is still to retire
    return move.source in rec.replicas
