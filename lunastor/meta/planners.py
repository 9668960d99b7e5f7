"""Background planners: work that exactly one meta instance must do at a time.

Meta instances are stateless over etcd and several may serve the API, but planners (drain
today; re-replication, rebalance, garbage collection later) must run once per cluster. The
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
from typing import Protocol

from lunastor.common.etcd import Compare, Election, Etcd, EtcdError, EtcdLeaseLost, Put
from lunastor.common.logs import get_logger
from lunastor.common.presence import Presence
from lunastor.common.records import ChunkAdminRecord, Keys, OperationRecord
from lunastor.meta.store import read

log = get_logger(component="planner")


class Planner(Protocol):
    name: str

    async def run_once(self) -> None: ...


class DrainPlanner:
    """Follows drains: an operation's progress is the share of replicas moved off the server.

    Moving replicas is the re-replication planner's job (not built yet); with no extent map,
    a draining server holds nothing and its drain completes on the first pass.
    """

    name = "drain"

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    async def run_once(self) -> None:
        admins, _ = await self.etcd.get_prefix(Keys.CHUNK_ADMIN)
        for kv in admins:
            admin = ChunkAdminRecord.from_json(kv.value)
            if admin.state != "draining":
                continue
            held, _ = await self.etcd.get_prefix(Keys.chunk_extents(admin.id))
            op, ov = await read(self.etcd, Keys.operation(admin.operation_id), OperationRecord)
            if op is None or held:
                continue  # progress for a non-empty server comes with re-replication
            now = round(time.time(), 6)
            done = dataclasses.replace(
                op, state="succeeded", progress=1.0, updated_at=now, detail="nothing left"
            )
            drained = dataclasses.replace(admin, state="drained")
            await self.etcd.txn(
                [ov.unchanged, Compare.mod_revision(kv.key) == kv.mod_revision],
                [Put(ov.key, done.to_json()), Put(kv.key, drained.to_json())],
            )


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
            try:
                await planner.run_once()
            except EtcdError as exc:
                log.warning("planner pass failed", planner=planner.name, error=str(exc))

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
