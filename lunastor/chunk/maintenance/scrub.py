"""Background scrub: every local replica's blocks verified against their checksums, at a
throttled rate; a bad block is repaired from a good member of the extent (docs/scrub.md).

A pass walks the replicas this chunk server holds (current ones only: a syncing or stale
replica is rebuilt, not scrubbed) in 1 MiB steps, reading only mapped blocks. A block that
fails its checksum is copied from another member of the extent's current generation, the same
READ-with-checksums + COPY that read repair uses (`volume.py`), but only while the extent is
quiet: the member's `applied_seq` must equal ours before and after the read, and the copy is
applied only if ours has not moved meanwhile (`Replica.apply_copy(if_applied=...)`), so a
repair can never put back data older than a write that raced with it. A block it could not
repair now is counted and retried in the next pass; the blocks a pass leaves unrepaired are
recorded under `Keys.scrub_errors(<chunk id>)` (replaced by each pass, deleted when none), so
meta shows them in the volume's status and CSI's volume condition.

Progress is an `OperationRecord` (`kind: scrub`, subject: this chunk server, id
`scrub-<chunk id>`, one record updated pass after pass), so `GET /v1/operations` shows it;
counts are in `/metrics` as `lunastor_scrub_*`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

from prometheus_client import Counter, Gauge

from lunastor.chunk.replication.extentmap import ExtentMap
from lunastor.chunk.store import (
    BLOCK_SIZE,
    ChecksumMismatch,
    ExtentStore,
    ExtentStoreError,
    ReplicaState,
)
from lunastor.chunk.store import checksums as cs
from lunastor.chunk.wire.messages import GetState, Read, Request, Response
from lunastor.chunk.wire.peer import PeerError
from lunastor.common.etcd import Etcd
from lunastor.common.etcd.errors import EtcdError
from lunastor.common.events import EVENTS
from lunastor.common.records import Keys, OperationRecord, ScrubErrorsRecord

log = logging.getLogger(__name__)

SCRUBBED_BYTES = Counter("lunastor_scrub_bytes_total", "Mapped bytes read and verified by scrub")
FOUND = Counter("lunastor_scrub_errors_total", "Blocks scrub found failing their checksum")
REPAIRED = Counter("lunastor_scrub_repairs_total", "Bad blocks scrub rewrote from a good member")
UNREPAIRED = Counter(
    "lunastor_scrub_unrepaired_total", "Bad blocks scrub could not repair in a pass (retried)"
)
PASSES = Counter("lunastor_scrub_passes_total", "Scrub passes completed")
PROGRESS = Gauge("lunastor_scrub_progress", "Fraction of the current scrub pass done (0..1)")

STEP = 1 << 20  # bytes of an extent verified per read
MAX_LISTED_ERRORS = 256  # unrepaired blocks listed in etcd per server; beyond: only counted

# `Replicas.call`: reach a member's data node (our own in-process)
RemoteCall = Callable[[str, Callable[[int], Request]], Awaitable[Response]]


@dataclass
class PassResult:
    replicas: int = 0
    bytes: int = 0
    bad: list[tuple[str, int, int]] = field(default_factory=list)  # (volume, extent, block)
    repaired: int = 0
    unrepaired: list[tuple[str, int, int]] = field(default_factory=list)


class Throttle:
    """At most `rate` bytes per second on average, measured from the start of the pass."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.done = 0

    async def account(self, n: int) -> None:
        self.done += n
        if self.rate <= 0:
            await asyncio.sleep(0)
            return
        ahead = self.start + self.done / self.rate - time.monotonic()
        await asyncio.sleep(max(0.0, ahead))


class Scrubber:
    def __init__(
        self,
        store: ExtentStore,
        emap: ExtentMap,
        call: RemoteCall,
        node_id: str,
        *,
        etcd: Etcd | None,
        rate: float,
        interval: float,
    ) -> None:
        self.store = store
        self.emap = emap
        self.call = call
        self.node_id = node_id
        self.etcd = etcd
        self.rate = rate
        self.interval = interval
        self.op_id = f"scrub-{node_id}"
        self._task: asyncio.Task[None] | None = None
        self._created = time.time()

    def start(self) -> None:
        if self.interval > 0:
            self._task = asyncio.create_task(self.run_forever(), name="scrub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a pass that failed must not stop the next ones
                log.exception("scrub pass failed")

    # -- one pass ----------------------------------------------------------------------------

    async def run_once(self) -> PassResult:
        keys = self.store.known_replicas()
        result = PassResult()
        throttle = Throttle(self.rate)
        await self._report(result, 0.0, "running", f"{len(keys)} replicas to verify")
        for n, (volume, index) in enumerate(keys):
            try:
                await self._scrub_replica(volume, index, result, throttle)
            except ExtentStoreError as exc:  # gone, closed, its data dir failed: next one
                log.info("scrub of %s/%d skipped: %s", volume, index, exc)
            done = (n + 1) / len(keys)
            PROGRESS.set(done)
            if n % 16 == 15:
                await self._report(result, done, "running", self._detail(result))
        PASSES.inc()
        PROGRESS.set(1.0)
        await self._report(result, 1.0, "succeeded", self._detail(result))
        await self._report_errors(result)
        return result

    @staticmethod
    def _detail(r: PassResult) -> str:
        return (
            f"{r.replicas} replicas, {r.bytes} bytes verified, {len(r.bad)} bad blocks, "
            f"{r.repaired} repaired"
        )

    async def _scrub_replica(
        self, volume: str, index: int, result: PassResult, throttle: Throttle
    ) -> None:
        replica = await self.store.open(volume, index)
        if replica.state != ReplicaState.CURRENT:
            return
        result.replicas += 1
        for offset in range(0, replica.extent_size, STEP):
            length = min(STEP, replica.extent_size - offset)
            try:
                _, sums = await replica.read_for_copy(offset, length)
                bad: list[int] = []
            except ChecksumMismatch as exc:
                bad = exc.blocks
                sums = b""
            mapped = cs.count_mapped(sums) if sums else length // BLOCK_SIZE
            SCRUBBED_BYTES.inc(mapped * BLOCK_SIZE)
            result.bytes += mapped * BLOCK_SIZE
            for block in bad:
                FOUND.inc()
                result.bad.append((volume, index, block))
                log.warning("scrub: block %d of %s/%d fails its checksum", block, volume, index)
                if await self._repair(volume, index, block):
                    REPAIRED.inc()
                    EVENTS.emit("scrub_repair", f"{volume}/{index}", f"block {block}")
                    result.repaired += 1
                else:
                    UNREPAIRED.inc()
                    EVENTS.emit("scrub_unrepaired", f"{volume}/{index}", f"block {block}")
                    result.unrepaired.append((volume, index, block))
            await throttle.account(mapped * BLOCK_SIZE)

    async def _repair(self, volume: str, index: int, block: int) -> bool:
        """Copy one block from a good member, only while the extent is quiet."""
        rec = self.emap.get(volume, index)
        if rec is None or self.node_id not in rec.replicas or rec.converging:
            return False
        replica = await self.store.open(volume, index)
        if replica.generation != rec.gen:
            return False
        offset = block * BLOCK_SIZE
        for member in rec.replicas:
            if member == self.node_id:
                continue
            try:
                seq = replica.applied_seq
                if await self._applied(member, volume, index) != seq:
                    continue
                got = await self.call(
                    member,
                    partial(
                        Read,
                        volume=volume,
                        extent=index,
                        gen=rec.gen,
                        offset=offset,
                        length=BLOCK_SIZE,
                        with_checksums=True,
                    ),
                )
                if not got.ok or await self._applied(member, volume, index) != seq:
                    continue
            except PeerError:
                continue
            data, sums = got.payload[:BLOCK_SIZE], got.payload[BLOCK_SIZE:]
            if await replica.apply_copy(offset, data, sums, if_applied=seq):
                log.warning(
                    "scrub: repaired block %d of %s/%d from %s", block, volume, index, member
                )
                return True
        return False

    async def _applied(self, member: str, volume: str, index: int) -> int | None:
        st = await self.call(member, partial(GetState, volume=volume, extent=index))
        return int(st.fields["applied_seq"]) if st.ok else None

    # -- progress in etcd --------------------------------------------------------------------

    async def _report_errors(self, r: PassResult) -> None:
        """This pass's unrepaired blocks, replacing the last pass's: the volume condition
        (meta) is abnormal while any block of the volume stays bad on a member."""
        if self.etcd is None:
            return
        key = Keys.scrub_errors(self.node_id)
        try:
            if not r.unrepaired:
                await self.etcd.delete(key)
                return
            listed = [list(b) for b in r.unrepaired[:MAX_LISTED_ERRORS]]
            more = len(r.unrepaired) - len(listed)
            rec = ScrubErrorsRecord(self.node_id, round(time.time(), 3), listed, more)
            await self.etcd.put(key, rec.to_json())
        except EtcdError as exc:  # the next pass writes it again
            log.warning("scrub errors not recorded: %s", exc)

    async def _report(self, r: PassResult, progress: float, state: str, detail: str) -> None:
        if self.etcd is None:
            return
        now = time.time()
        op = OperationRecord(
            id=self.op_id,
            kind="scrub",
            subject=self.node_id,
            state=state,
            progress=round(progress, 4),
            created_at=self._created,
            updated_at=now,
            detail=detail,
        )
        try:
            await self.etcd.put(Keys.operation(self.op_id), op.to_json())
        except EtcdError as exc:  # progress reporting must not stop the scrub
            log.warning("scrub progress not recorded: %s", exc)
