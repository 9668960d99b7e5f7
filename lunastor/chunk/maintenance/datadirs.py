"""Data directories that fail on a live chunk server (docs/datapath.md, "A data directory
fails").

A data directory that returns an IO error, goes read-only or disappears (unmounted, removed)
is found by a periodic probe (`ExtentStore.check_data_dirs`: exists, same file system,
write + fsync work) or by any request that meets a `DataDirFailed`. Then, once:

1. the store retires it: nothing is created, opened or kept open there any more
   (`ExtentStore.retire_dir`); the replicas it held are *lost* (`DataNode.lost`): never
   recreated empty while the extent map still names us (that copy would serve zeros);
2. it is reported: `lunastor_data_dir_failed{path}` = 1, `lunastor_data_dir_failures_total`,
   and the chunk server's live status record lists the directory with `state: failed`;
3. for every lost replica whose extent still names us, the chunk server leaves the replica
   set through the existing paths: as a secondary it asks the primary to flush the extent,
   which fails on us, so the primary removes us (`gen + 1` by transaction, the remaining
   members told the new gen); as the primary it stops acknowledging for the extent and
   hands it to the most advanced other member (`AccessPath.resign`: the failover commit and
   convergence, without the lease wait). Re-replication can then restore the replica count.
   Extents that still name us are retried soon (from `LEAVE_RETRY`, doubling up to the
   probe interval).

The same happens at start for replicas the extent map says we hold as a secondary but no data
directory has (a replaced, empty disk under the same identity): `find_missing_replicas`.

A full data directory is not failed: writes that need space get SPACE ALLOCATION FAILED
(`SpaceExhausted`) and the directory stays in service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from functools import partial

from prometheus_client import Counter, Gauge

from lunastor.chunk.access.volume import AccessPath
from lunastor.chunk.replication.extentmap import ExtentMap
from lunastor.chunk.replication.node import DataNode
from lunastor.chunk.store import DataDirFailed, ExtentStore
from lunastor.chunk.wire.messages import Flush, GetState
from lunastor.chunk.wire.peer import PeerError
from lunastor.common.events import EVENTS

log = logging.getLogger(__name__)

DIR_FAILED = Gauge(
    "lunastor_data_dir_failed", "1 once a data directory was taken out of service", ["path"]
)
DIR_FAILURES = Counter("lunastor_data_dir_failures_total", "Data directories taken out of service")
REPLICAS_LOST = Counter(
    "lunastor_data_dir_replicas_lost_total", "Replicas lost with a failed data directory"
)
REPLICAS_MISSING = Counter(
    "lunastor_replicas_missing_total",
    "Replicas named in the extent map that no data directory held at start (wiped disk)",
)


LEAVE_RETRY = 0.5  # seconds before a refused leave of a lost replica's set is tried again


class DataDirMonitor:
    def __init__(
        self,
        store: ExtentStore,
        node: DataNode,
        path: AccessPath,
        emap: ExtentMap,
        chunk_id: str,
        *,
        interval: float,
        changed: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.node = node
        self.path = path
        self.emap = emap
        self.chunk_id = chunk_id
        self.interval = interval
        self.changed = changed  # the status record should be rewritten
        self._task: asyncio.Task[None] | None = None
        self._pending: list[DataDirFailed] = []
        self._retired: set[str] = set()
        self._wake = asyncio.Event()
        for d in store.data_dirs:
            DIR_FAILED.labels(d).set(0)
        node.on_data_dir_failed = self.notice

    def start(self) -> None:
        self._task = asyncio.create_task(self.run_forever(), name="data dir monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def notice(self, exc: DataDirFailed) -> None:
        """A request met a failed data directory: retire it soon (not inside the request)."""
        if exc.path in self.store.data_dirs and exc.path not in self._retired:
            self._pending.append(exc)
            self._wake.set()

    async def run_forever(self) -> None:
        try:
            await self.find_missing_replicas()
        except asyncio.CancelledError:
            raise
        except Exception:  # a replica found missing later fails its flush or write instead
            log.exception("looking for missing replicas failed")
        retry = LEAVE_RETRY
        while True:
            # Lost replicas still named here wait for their replica sets to drop us before
            # re-replication can start: a refused leave (the primary not yet seeing us
            # serve, busy with a failover) is tried again soon, backing off to the probe
            # interval, not only at the next probe (seconds of a rebuild's time otherwise).
            wait = min(retry, self.interval) if self.node.lost else self.interval
            retry = min(retry * 2, self.interval) if self.node.lost else LEAVE_RETRY
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next probe tries again
                log.exception("data directory check failed")

    async def run_once(self) -> list[str]:
        """Probe, retire what failed, leave the replica sets of lost replicas. Returns the
        directories retired by this call."""
        self.store.check_data_dirs()
        pending, self._pending = self._pending, []
        for exc in pending:
            self.store.failed.setdefault(exc.path, exc)
        retired = []
        for d, exc in list(self.store.failed.items()):
            if d in self._retired:
                continue
            self._retired.add(d)
            retired.append(d)
            lost = self.store.retire_dir(exc)
            self.node.lost.update(lost)
            for key in lost:
                self.node.step_down(*key)
            DIR_FAILED.labels(d).set(1)
            DIR_FAILURES.inc()
            EVENTS.emit("data_dir_failed", d, f"{exc}; {len(lost)} replicas lost")
            REPLICAS_LOST.inc(len(lost))
            log.error("data directory %s out of service (%s): %d replicas lost", d, exc, len(lost))
        if retired and self.changed is not None:
            self.changed()
        await self.leave_replica_sets()
        return retired

    async def find_missing_replicas(self) -> list[tuple[str, int]]:
        """Replicas the extent map says we hold as a secondary but no data directory has (a
        wiped or replaced disk, deleted files) are lost like a failed directory's: we leave
        those replica sets and re-replication copies the data back.

        Only where the primary's replica maps a block, and ours is still missing after its
        answer. A new extent's primary creates its own replica, then each secondary's
        (`DataNode._ensure_secondary`), and only then applies its first write: a server
        starting while an extent is allocated finds the primary's replica before its own
        arrives. Leaving then dropped a healthy member of a new extent (issue 14: three
        members became two, and a crash of one more left it below `min_replicas` for
        `replace_after`). No block mapped at the primary means nothing to miss (not
        `applied_seq`: a snapshot's preserved copy holds data it never applied as a write); a
        replica created while the primary answered is not missing."""
        missing = []
        for volume, index in self.emap.ids():
            if not self.store.owns(volume, index):
                continue  # a sibling worker's (chunk/workers.py)
            rec = self.emap.get(volume, index)
            if rec is None or self.chunk_id not in rec.replicas[1:]:
                continue
            if self.store.has_replica(volume, index):
                continue
            try:
                st = await self.node.replicas.call(
                    rec.primary, partial(GetState, volume=volume, extent=index)
                )
            except PeerError:
                continue  # the primary's own failure is someone else's repair
            holds_data = st.ok and st.fields["mapped_blocks"] > 0
            if holds_data and not self.store.has_replica(volume, index):
                missing.append((volume, index))
        if missing:
            REPLICAS_MISSING.inc(len(missing))
            log.error("%d replicas named in the extent map are missing here", len(missing))
            self.node.lost.update(missing)
            await self.leave_replica_sets()
        return missing

    async def leave_replica_sets(self) -> None:
        named = []
        for volume, index in sorted(self.node.lost):
            rec = self.emap.get(volume, index)
            if rec is not None and self.node.lost_here(volume, index):
                named.append((volume, index, rec.gen, rec.primary == self.chunk_id))
        # forget lost replicas no extent names us for any more (removed, or the extent gone)
        # and those a join copied back
        self.node.lost.intersection_update((v, i) for v, i, _, _ in named)
        await asyncio.gather(*(self._leave(*n) for n in named))

    async def _leave(self, volume: str, index: int, gen: int, primary: bool) -> None:
        try:
            if primary:
                await self.path.resign(volume, index)
                return
            rec = self.emap.get(volume, index)
            if rec is None:
                return
            # the primary flushes every member; ours fails, so it removes us (gen + 1)
            resp = await self.node.replicas.call(
                rec.primary, partial(Flush, volume=volume, extent=index, gen=gen)
            )
            if not resp.ok:
                log.info("extent %s/%d: flush at the primary: %s", volume, index, resp.status)
        except PeerError as exc:
            log.info("extent %s/%d: cannot reach the primary yet: %s", volume, index, exc)
