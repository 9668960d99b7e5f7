"""Background planners: work that exactly one meta instance must do at a time.

Meta instances are stateless over etcd and several may serve the API, but planners (drain
and rebuild reporting today; rebalance, garbage collection later) must run once per cluster. The
instances campaign in the etcd election `Keys.PLANNER_ELECTION` on their presence lease; the
leader runs every planner's `run_once()` each `planner_interval`. Leadership ends with the
lease, so a partitioned leader stops before another one starts. Tests call `run_once()`
directly instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter, Histogram

from lunastor.common.etcd import (
    Compare,
    Election,
    Etcd,
    EtcdError,
    EtcdLeaseLost,
    KeyValue,
    Put,
)
from lunastor.common.events import EVENTS
from lunastor.common.extent_pages import extent_records, held_counts
from lunastor.common.logs import get_logger
from lunastor.common.presence import Presence
from lunastor.common.records import (
    ChunkAdminRecord,
    ChunkServerInfo,
    ChunkServerStatus,
    ExtentRecord,
    Keys,
    OperationRecord,
    RecordError,
    VolumeRecord,
    decode_records,
)
from lunastor.meta.store import new_id, read

log = get_logger(component="planner")

# The leader runs every planner one after another each `planner_interval`: a pass that grows
# (a planner reading more of etcd as the cluster grows) delays all the others, and its etcd
# reads compete with the API's requests. These say which planner, and how often one failed.
PASS_SECONDS = Histogram(
    "lunastor_planner_pass_seconds",
    "Wall time of one planner pass by planner (the planner leader only)",
    ["planner"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
PASS_FAILURES = Counter(
    "lunastor_planner_pass_failures_total",
    "Planner passes that ended on an etcd error, by planner (retried at the next pass)",
    ["planner"],
)


class Planner(Protocol):
    name: str

    async def run_once(self) -> None: ...


@dataclass(frozen=True)
class ExtentCensus:
    """One read of the extent map, volumes and chunk servers: what the planners count."""

    extents: list[ExtentRecord]
    desired: dict[str, int]  # volume id -> replicas
    live: set[str]
    registered: set[str]
    held: dict[str, int]  # chunk id -> extents it is a member of (the reverse index)

    @classmethod
    async def read(cls, etcd: Etcd) -> ExtentCensus:
        kvs, rev = await etcd.get_prefix(Keys.EXTENTS)
        extents = extent_records(kvs)
        registered, live = await server_ids(etcd, rev)
        index, _ = await etcd.get_prefix(Keys.CHUNK_EXTENTS, revision=rev)
        return cls(
            extents,
            {v.id: v.replicas for v in await records_with_extents(etcd, extents, rev)},
            live,
            registered,
            held_counts(index, kvs),
        )

    def held_by(self, chunk_id: str) -> int:
        return self.held.get(chunk_id, 0)

    def unrestored(self, chunk_id: str) -> int:
        """Extents still naming the server, plus extents missing replicas (of any cause)."""
        return sum(
            chunk_id in e.replicas
            or len([m for m in e.replicas if m in self.live]) < self.desired.get(e.volume, 0)
            for e in self.extents
        )


async def server_ids(etcd: Etcd, revision: int | None = None) -> tuple[set[str], set[str]]:
    """The chunk servers registered, and those with a live record, at `revision` (now when
    None)."""
    chunks, rev = await etcd.get_prefix(Keys.CHUNKS, revision=revision)
    lives, _ = await etcd.get_prefix(Keys.LIVE_CHUNKS, revision=rev)
    return (
        {c.id for c in decode_records(chunks, ChunkServerInfo)},
        {s.id for s in decode_records(lives, ChunkServerStatus)},
    )


async def records_with_extents(
    etcd: Etcd, extents: Iterable[ExtentRecord], revision: int
) -> list[VolumeRecord]:
    """The records of the volumes `extents` belong to, at `revision`. Only those are decoded
    (a thin cluster has many volumes never written), and none is read when there are no
    extents."""
    keys = {Keys.volume(e.volume) for e in extents}
    if not keys:
        return []
    vols, _ = await etcd.get_prefix(Keys.VOLUMES, revision=revision)
    return decode_records([kv for kv in vols if kv.key in keys], VolumeRecord)


def advance(op: OperationRecord, pending: int, detail: str) -> OperationRecord:
    """`op` with `pending` work items left: progress is the share of its total done, and
    never goes back while it runs. More items can become pending after it started (an extent
    restored then degraded again, another one found); the bar then waits for the work to pass
    where it was, and `detail` says how many are left meanwhile."""
    total = max(op.total, pending)
    progress = 1.0 if total == 0 else round(1 - pending / total, 4)
    return dataclasses.replace(op, total=total, progress=max(op.progress, progress), detail=detail)


class DrainPlanner:
    """Follows drains: progress is the share of the server's extents moved off it.

    The chunk servers move the replicas (each extent's primary joins a replacement, then
    retires the draining member: docs/datapath.md, "Rebuild, catch-up and drain"); this
    planner counts the extents still naming the server, and completes the drain when none do.
    """

    name = "drain"

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    async def run_once(self) -> None:
        admins, _ = await self.etcd.get_prefix(Keys.CHUNK_ADMIN)
        census: ExtentCensus | None = None
        for kv in admins:
            admin = ChunkAdminRecord.from_json(kv.value)
            if admin.state != "draining":
                continue
            op, ov = await read(self.etcd, Keys.operation(admin.operation_id), OperationRecord)
            if op is None:
                continue
            census = census or await ExtentCensus.read(self.etcd)
            held = census.held_by(admin.id)
            now = round(time.time(), 6)
            if held:
                moving = advance(op, held, f"{held} extents still on {admin.id}")
                if (moving.progress, moving.total) != (op.progress, op.total):
                    moving = dataclasses.replace(moving, updated_at=now)
                    await self.etcd.txn([ov.unchanged], [Put(ov.key, moving.to_json())])
                continue
            done = dataclasses.replace(
                op,
                state="succeeded",
                progress=1.0,
                updated_at=now,
                detail=f"{op.total} extents moved" if op.total else "nothing left",
            )
            drained = dataclasses.replace(admin, state="drained")
            result = await self.etcd.txn(
                [ov.unchanged, Compare.mod_revision(kv.key) == kv.mod_revision],
                [Put(ov.key, done.to_json()), Put(kv.key, drained.to_json())],
            )
            if result.succeeded:
                await EVENTS.write("drain_done", admin.id, done.detail)


class RebuildPlanner:
    """Reports re-replication after a chunk server is lost, as a `rebuild` operation.

    The chunk servers do the work (each extent's primary removes the dead member after
    `replace_after` and joins a replacement). For every registered server without a live
    record (and not drained) while some extent still names it or lacks replicas, this planner
    keeps one running `rebuild` operation (subject: that server): progress is the share of
    those extents restored; it succeeds when none is left. A server that returns and catches
    up ends it the same way.
    """

    name = "rebuild"

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    async def run_once(self) -> None:
        ops_kv, _ = await self.etcd.get_prefix(Keys.OPERATIONS)
        running: dict[str, tuple[OperationRecord, KeyValue]] = {}
        for kv in ops_kv:
            with contextlib.suppress(RecordError):
                op = OperationRecord.from_json(kv.value)
                if op.kind == "rebuild" and op.state == "running":
                    running[op.subject] = (op, kv)
        admins, _ = await self.etcd.get_prefix(Keys.CHUNK_ADMIN)
        drained = {a.id for a in decode_records(admins, ChunkAdminRecord) if a.state == "drained"}
        registered, live = await server_ids(self.etcd)
        if not running and not registered - live - drained:
            return  # the census reads the whole extent map: only when there is news to report
        census = await ExtentCensus.read(self.etcd)
        now = round(time.time(), 6)
        lost = census.registered - census.live - drained
        for chunk_id in sorted(lost | running.keys()):
            pending = census.unrestored(chunk_id)
            found = running.get(chunk_id)
            if found is None:
                if not pending:
                    continue
                op = OperationRecord(
                    id=new_id("op"),
                    kind="rebuild",
                    subject=chunk_id,
                    created_at=now,
                    updated_at=now,
                    total=pending,
                    detail=f"{pending} extents to restore",
                )
                await self.etcd.create(Keys.operation(op.id), op.to_json())
                await EVENTS.write("rebuild_started", chunk_id, op.detail)
                continue
            op, kv = found
            if pending:
                moved = advance(op, pending, f"{pending} extents to restore")
                if (moved.progress, moved.total) == (op.progress, op.total):
                    continue
                new = dataclasses.replace(moved, updated_at=now)
            else:
                new = dataclasses.replace(
                    op,
                    state="succeeded",
                    progress=1.0,
                    updated_at=now,
                    detail=f"{op.total} extents restored",
                )
            result = await self.etcd.txn(
                [Compare.mod_revision(kv.key) == kv.mod_revision], [Put(kv.key, new.to_json())]
            )
            if result.succeeded and new.state == "succeeded":
                await EVENTS.write("rebuild_done", chunk_id, new.detail)


class PlannerLeader:
    """Campaigns for the planner lease and runs the planners while it leads."""

    def __init__(
        self,
        etcd: Etcd,
        presence: Presence,
        instance_id: str,
        planners: list[Planner],
        interval: float,
    ) -> None:
        self.etcd = etcd
        self.presence = presence
        self.instance_id = instance_id
        self.planners = planners
        self.interval = interval
        self.leading = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="planner-leader")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.leading.clear()

    async def run_once(self) -> None:
        for planner in self.planners:
            start = time.perf_counter()
            try:
                await planner.run_once()
            except EtcdError as exc:
                PASS_FAILURES.labels(planner.name).inc()
                log.warning("planner pass failed", planner=planner.name, error=str(exc))
            finally:
                PASS_SECONDS.labels(planner.name).observe(time.perf_counter() - start)

    async def _run(self) -> None:
        while True:
            await self.presence.held.wait()
            lease = self.presence.lease_id
            election = Election(self.etcd, Keys.PLANNER_ELECTION, self.instance_id.encode(), lease)
            try:
                await election.campaign()
                self.leading.set()
                log.info("leading the planners", lease=f"{lease:x}")
                while self.presence.held.is_set() and self.presence.lease_id == lease:
                    await self.run_once()
                    await asyncio.sleep(self.interval)
            except (EtcdLeaseLost, EtcdError) as exc:
                log.warning("planner election interrupted", error=str(exc))
                await asyncio.sleep(min(1.0, self.interval))
            finally:
                if self.leading.is_set():
                    log.info("no longer leading the planners")
                self.leading.clear()
