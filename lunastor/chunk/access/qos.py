"""Per-volume QoS at the access point: token buckets in front of a volume (docs/qos.md).

A volume with limits (`VolumeRecord.qos`) is served through a `LimitedVolume`: the same
`BlockDevice`, whose `read` and mutations first pass its `Limiter`. A volume without limits
has no limiter object at all: its `LogicalUnit` holds the `ReplicatedVolume` itself, so the
unlimited path costs nothing. Limits change online: `apply_limits` reconfigures the buckets
in place (queued commands are re-timed at once) or swaps the unit's device.

The limiter delays only the commands of its own volume: each waiting command is a future in
the volume's own queue, woken by one timer per queue; nothing blocks the event loop, so a
volume at its limit never holds up another volume's commands.

Buckets run on debt: a command may start when every bucket it draws from is not negative,
and then takes its whole cost (1 IO, its bytes), which may leave the bucket below zero. So a
command larger than a bucket still passes (it then waits its cost's worth before the next),
and the long-run rate is exact whatever the command sizes.

A `LimitedVolume` offers no synchronous ("inline") IO methods and says `inline_ok =
False` (the inline I/O contract of the iSCSI fast path, `blockdev.InlineBlockDevice`): the
fast path never runs a limited volume's IO around the limiter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from lunastor.common.qos import QosError, QosLimits
from lunastor.common.records import VolumeRecord
from lunastor.common.volume_io import VolumeIo
from lunastor.iscsi.blockdev import BlockDevice, LbaStatus
from lunastor.iscsi.scsi.types import Nexus as ScsiNexus

log = logging.getLogger(__name__)

WINDOW = 0.05  # seconds of its rate a bucket holds when no burst is configured
PEAK_WINDOW = 0.01  # seconds of its peak rate the peak bucket of a burst holds
OPS = ("read", "write")


@dataclass(slots=True)
class Bucket:
    """A token bucket: `rate` tokens a second, at most `capacity` saved up."""

    name: str
    bytes: bool  # costs bytes (else one per command)
    rate: float
    capacity: float
    tokens: float
    stamp: float

    def refill(self, now: float, cap: bool = True) -> None:
        """Add what accrued since the last refill. `cap=False` while commands wait: what
        accrued then is theirs even beyond the capacity (a timer that fired late, on a
        busy loop, must not lose rate); the caller caps afterwards."""
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.tokens = min(self.capacity, tokens) if cap else tokens
        self.stamp = now

    def wait(self) -> float:
        """Seconds until this bucket is no longer in debt."""
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


def buckets_for(limits: QosLimits, share: float) -> dict[str, tuple[float, float]]:
    """{bucket name: (rate, capacity)} of `limits` scaled by `share` (0 < share <= 1): per
    limited rate a sustained bucket, plus a peak bucket when it has a burst."""
    out: dict[str, tuple[float, float]] = {}
    for name in ("iops", "read_iops", "write_iops", "bps", "read_bps", "write_bps"):
        rate = getattr(limits, name) * share
        if not rate:
            continue
        burst = getattr(limits, f"{name}_burst") * share
        if burst:
            out[name] = (rate, (burst - rate) * limits.burst_duration + rate * WINDOW)
            out[f"{name}_peak"] = (burst, burst * PEAK_WINDOW)
        else:
            out[name] = (rate, rate * WINDOW)
    return out


def _applies(bucket: str, op: str) -> bool:
    """Whether a bucket limits `op`: iops/bps limit both, read_*/write_* their own op."""
    return not bucket.startswith(("read_", "write_")) or bucket.startswith(op + "_")


class Limiter:
    """The buckets of one volume at one access point, and its queues of waiting commands."""

    def __init__(
        self,
        limits: QosLimits,
        io: VolumeIo | None = None,
        *,
        share: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.io = io
        self.clock = clock
        self.limits = limits
        self.share = share
        self._buckets: dict[str, Bucket] = {}
        self._by_op: dict[str, list[Bucket]] = {op: [] for op in OPS}
        self._queues: dict[str, deque[tuple[asyncio.Future[None], int, float]]] = {
            op: deque() for op in OPS
        }
        self._timers: dict[str, asyncio.TimerHandle | None] = dict.fromkeys(OPS)
        # what passed, per op: [commands, bytes], for the demand this access point publishes
        # (qos_share.QosCoordinator)
        self._admitted: dict[str, list[int]] = {op: [0, 0] for op in OPS}
        self.throttled = 0  # commands that had to wait
        # qos_share.QosCoordinator: told of the first command after `idle` was set
        self.idle = False
        self.on_active: Callable[[], None] | None = None
        self.configure(limits, share)

    def configure(self, limits: QosLimits, share: float | None = None) -> None:
        """New limits or a new share, effective at once: saved tokens and debt are kept
        (capped by the new capacity) and waiting commands are re-timed."""
        if share is not None:
            self.share = max(1e-6, min(1.0, share))
        self.limits = limits
        now = self.clock()
        old = self._buckets
        new: dict[str, Bucket] = {}
        for name, (rate, capacity) in buckets_for(limits, self.share).items():
            prev = old.get(name)
            if prev is None:
                tokens = capacity
            else:
                prev.refill(now)
                # a debt is IO that already passed: it is paid off at the new rate
                tokens = min(prev.tokens, capacity)
            new[name] = Bucket(name, "bps" in name, rate, capacity, tokens, now)
        self._buckets = new
        self._by_op = {op: [b for n, b in new.items() if _applies(n, op)] for op in OPS}
        for op in OPS:
            if self._queues[op]:
                self._pump(op)

    def admit(self, op: str, nbytes: int) -> asyncio.Future[None] | None:
        """None: the command may go now (its cost is taken). Else a future to await first
        (cancel it to give up the place: nothing is taken then)."""
        if self.idle:
            self.idle = False
            if self.on_active is not None:
                self.on_active()
        queue = self._queues[op]
        if not queue:
            buckets = self._by_op[op]
            now = self.clock()
            for b in buckets:
                b.refill(now)
            if all(b.tokens >= 0 for b in buckets):
                self._take(op, buckets, nbytes)
                return None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append((waiter, nbytes, self.clock()))
        self.throttled += 1
        if len(queue) == 1:
            self._pump(op)
        return waiter

    def _take(self, op: str, buckets: Sequence[Bucket], nbytes: int) -> None:
        for b in buckets:
            b.tokens -= nbytes if b.bytes else 1
        admitted = self._admitted[op]
        admitted[0] += 1
        admitted[1] += nbytes

    def counts(self) -> dict[str, tuple[int, int]]:
        """Commands and bytes admitted so far, per op."""
        return {op: (n, b) for op, (n, b) in self._admitted.items()}

    def _pump(self, op: str) -> None:
        timer = self._timers[op]
        if timer is not None:
            timer.cancel()
            self._timers[op] = None
        queue = self._queues[op]
        buckets = self._by_op[op]
        now = self.clock()
        for b in buckets:
            b.refill(now, cap=False)
        while queue:
            waiter, nbytes, since = queue[0]
            if waiter.done():  # given up (task aborted, connection lost)
                queue.popleft()
                continue
            if any(b.tokens < 0 for b in buckets):
                break
            queue.popleft()
            self._take(op, buckets, nbytes)
            waiter.set_result(None)
            if self.io is not None:
                self.io.throttled(op, now - since)
        for b in buckets:
            b.tokens = min(b.tokens, b.capacity)
        if queue:
            delay = max(b.wait() for b in buckets)
            self._timers[op] = asyncio.get_running_loop().call_later(delay, self._pump, op)

    def release_all(self) -> None:
        """Limits removed: every waiting command goes now."""
        for op in OPS:
            timer = self._timers[op]
            if timer is not None:
                timer.cancel()
                self._timers[op] = None
            queue = self._queues[op]
            while queue:
                waiter, _, _ = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)

    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())


async def _wait(waiter: asyncio.Future[None]) -> None:
    try:
        await waiter
    except BaseException:  # aborted while waiting (GeneratorExit, CancelledError)
        waiter.cancel()
        raise


class LimitedVolume:
    """A `BlockDevice` that admits each command through a `Limiter` before `device` runs it.

    Reads and writes cost one IO and their bytes; WRITE SAME and COMPARE AND WRITE count as
    writes of the bytes they write, UNMAP as one write IO of no bytes. SYNCHRONIZE CACHE and
    GET LBA STATUS are not limited (they move no data)."""

    inline_ok = False  # never run IO inline (synchronously) around the limiter

    def __init__(self, device: BlockDevice, limiter: Limiter) -> None:
        self.device = device
        self.limiter = limiter

    @property
    def block_size(self) -> int:
        return self.device.block_size

    @property
    def physical_block_size(self) -> int:
        return self.device.physical_block_size

    @property
    def num_blocks(self) -> int:
        return self.device.num_blocks

    @property
    def read_only(self) -> bool:
        return self.device.read_only

    @property
    def thin(self) -> bool:
        return self.device.thin

    @property
    def capacity_generation(self) -> int:
        return self.device.capacity_generation

    async def read(self, lba: int, blocks: int) -> bytes | bytearray | memoryview:
        waiter = self.limiter.admit("read", blocks * self.device.block_size)
        if waiter is not None:
            await _wait(waiter)
        return await self.device.read(lba, blocks)

    async def write(
        self,
        lba: int,
        data: bytes | bytearray | memoryview,
        fua: bool,
        nexus: ScsiNexus | None = None,
    ) -> None:
        waiter = self.limiter.admit("write", len(data))
        if waiter is not None:
            await _wait(waiter)
        await self.device.write(lba, data, fua, nexus)

    async def flush(self) -> None:
        await self.device.flush()

    async def unmap(
        self, ranges: Sequence[tuple[int, int]], nexus: ScsiNexus | None = None
    ) -> None:
        waiter = self.limiter.admit("write", 0)
        if waiter is not None:
            await _wait(waiter)
        await self.device.unmap(ranges, nexus)

    async def write_same(
        self,
        lba: int,
        blocks: int,
        pattern: bytes | bytearray | memoryview,
        unmap: bool,
        nexus: ScsiNexus | None = None,
    ) -> None:
        cost = 0 if unmap and not any(pattern) else blocks * self.device.block_size
        waiter = self.limiter.admit("write", cost)
        if waiter is not None:
            await _wait(waiter)
        await self.device.write_same(lba, blocks, pattern, unmap, nexus)

    async def compare_and_write(
        self,
        lba: int,
        verify: bytes | bytearray | memoryview,
        data: bytes | bytearray | memoryview,
        nexus: ScsiNexus | None = None,
    ) -> None:
        waiter = self.limiter.admit("write", len(data))
        if waiter is not None:
            await _wait(waiter)
        await self.device.compare_and_write(lba, verify, data, nexus)

    async def lba_status(self, lba: int) -> Sequence[LbaStatus]:
        return await self.device.lba_status(lba)


class Unit(Protocol):
    """What `apply_limits` needs of a LUN: the device the SCSI layer runs commands on."""

    device: BlockDevice


def apply_limits(
    record: VolumeRecord,
    volume: BlockDevice,
    unit: Unit,
    io: VolumeIo | None = None,
    on_change: Callable[[str, Limiter | None], None] | None = None,
) -> None:
    """Make `unit` serve `volume` with the limits of `record`: through a `LimitedVolume` when
    it has limits (reconfigured in place when it already had some), `volume` itself when not.
    A record whose limits do not parse keeps the limits it had (and says so in the log).
    `on_change(volume id, limiter or None)` is told when a limiter appears or goes."""
    try:
        limits = QosLimits.from_dict(record.qos)
    except (QosError, TypeError) as exc:
        log.error("volume %s: QoS limits %r ignored: %s", record.id, record.qos, exc)
        return
    current = unit.device
    if limits.limited:
        if isinstance(current, LimitedVolume):
            if current.limiter.limits != limits:
                current.limiter.configure(limits)
            return
        limiter = Limiter(limits, io)
        unit.device = LimitedVolume(volume, limiter)
        if on_change is not None:
            on_change(record.id, limiter)
    elif isinstance(current, LimitedVolume):
        unit.device = volume
        current.limiter.release_all()
        if on_change is not None:
            on_change(record.id, None)
