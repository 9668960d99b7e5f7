"""A history checker for the strongest claim the data path makes: a read returns the last write
acknowledged before it started, or one concurrent with it (a linearizable register per block).

Two access points serve one volume at once (as multipath would), each with a writer and a
reader on a handful of blocks, while a fault strikes; every operation is recorded with when it
started and when it returned, and every read is then checked against the per-block register
model. Failed or unfinished writes may or may not have taken effect: they are "concurrent
with everything after their start". The cluster is the in-process one of test_replication.py
(real etcd, real data ports, real stores).

Faults:
- **partition**: a secondary that serves as an access point is cut off from the extent's
  primary and its view of the extent map freezes (as if cut off from etcd too), while its own
  initiator still reaches it. The primary drops it after its read lease runs out and goes on
  acknowledging writes through the other access point; the cut-off one must stop serving reads
  from its replica, which no longer gets those writes.
- **kill**: the extent's primary dies (port closed, live record gone) under both access points;
  the survivors fail over.

The negative control turns read leases off (`DataNode.may_serve_read` always yes) in the
partition case: the checker must then find stale reads, or it proves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import struct
import time
from collections import defaultdict
from dataclasses import dataclass

import pytest

from lunastor.chunk.access.volume import ReplicatedVolume
from lunastor.common.records import ExtentRecord
from tests.integration.chunk.test_replication import Cluster
from tests.integration.chunk.test_replication import cluster as cluster

REGISTERS = 4  # blocks written and read; few, so that reads often race writes
SECTORS = 8  # one 4 KiB block per register, in 512-byte sectors
BEFORE = 0.8  # seconds of traffic before the fault
AFTER = 3.0  # and after it


@dataclass
class Op:
    kind: str  # "write" or "read"
    register: int
    value: int  # written, or read (0: never written)
    start: float
    end: float = math.inf  # when it returned; inf: failed or never returned (a write only)


def encode(value: int) -> bytes:
    return struct.pack("<Q", value) * (SECTORS * 512 // 8)


def decode(block: bytes) -> int:
    (value,) = struct.unpack_from("<Q", block)
    assert block == encode(value), "a torn block: parts of two writes"
    return value


def anomalies(history: list[Op]) -> list[str]:
    """Every read that returned a value it may not: a value nobody had started to write by
    the time it returned, or one overwritten by a write that ended before it began."""
    writes: dict[int, dict[int, Op]] = defaultdict(dict)
    for op in history:
        if op.kind == "write":
            writes[op.register][op.value] = op
    found = []
    for r in (op for op in history if op.kind == "read"):
        mine = writes[r.register]
        w = mine.get(r.value)
        if r.value and (w is None or w.start > r.end):
            found.append(f"read of block {r.register} returned {r.value}, never written yet")
            continue
        done = w.end if w is not None else -math.inf  # 0: as if written at the beginning
        for later in mine.values():
            if later is not w and later.start > done and later.end < r.start:
                found.append(
                    f"stale read of block {r.register} at {r.start:.3f}: got {r.value}, "
                    f"but {later.value} was acknowledged at {later.end:.3f}"
                )
                break
    return found


class Workload:
    """A writer and a reader per access point, recording every operation."""

    def __init__(self, volumes: dict[str, ReplicatedVolume]) -> None:
        self.volumes = volumes
        self.history: list[Op] = []
        self.stop = asyncio.Event()
        self.next_value = 1

    async def writer(self, v: ReplicatedVolume, rng: random.Random) -> None:
        while not self.stop.is_set():
            op = Op("write", rng.randrange(REGISTERS), self.next_value, time.monotonic())
            self.next_value += 1
            self.history.append(op)
            with contextlib.suppress(Exception):  # failed: may or may not have taken effect
                await v.write(op.register * SECTORS, encode(op.value), fua=False)
                op.end = time.monotonic()
            await asyncio.sleep(rng.uniform(0, 0.004))

    async def reader(self, v: ReplicatedVolume, rng: random.Random) -> None:
        while not self.stop.is_set():
            register = rng.randrange(REGISTERS)
            start = time.monotonic()
            try:
                data = await v.read(register * SECTORS, SECTORS)
            except Exception:
                await asyncio.sleep(0.01)  # a failed read returned nothing: nothing to check
                continue
            self.history.append(Op("read", register, decode(bytes(data)), start, time.monotonic()))
            await asyncio.sleep(rng.uniform(0, 0.002))

    async def run(self, fault: asyncio.Future[None] | None = None) -> None:
        rng = random.Random(7)
        tasks = [
            asyncio.create_task(job(v, random.Random(rng.random())))
            for v in self.volumes.values()
            for job in (self.writer, self.reader)
        ]
        await asyncio.sleep(BEFORE)
        if fault is not None:
            await fault
        await asyncio.sleep(AFTER)
        self.stop.set()
        done, pending = await asyncio.wait(tasks, timeout=2)
        for t in pending:  # a write stuck behind a dead peer: it stays "unfinished"
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]

    def reads(self) -> int:
        return sum(op.kind == "read" for op in self.history)


async def _record(c: Cluster) -> ExtentRecord:
    v = c.volume("chunk-0")
    await v.write(0, encode(0), fua=True)  # allocates extent 0 (blocks stay 0: "unwritten")
    rec = c.nodes["chunk-0"].emap.get("vol-t", 0)
    assert rec is not None and len(rec.replicas) == 3
    return rec


async def _partition(c: Cluster, victim: str, primary: str) -> None:
    """Cut `victim` off from `primary` (both ways) and from etcd's extent map: its watch of
    the map stops, so it goes on believing it is a current member."""
    await c.nodes[victim].emap.extents.stop()
    c.cut(primary, victim)  # the dead client is closed with the cluster's clients


async def _partition_run(c: Cluster, leases: bool) -> Workload:
    rec = await _record(c)
    victim, other = rec.replicas[1], rec.replicas[2]
    if not leases:
        c.nodes[victim].node.may_serve_read = lambda volume, index: True  # type: ignore[method-assign]
    work = Workload({ap: c.volume(ap) for ap in (victim, other)})
    await work.run(asyncio.ensure_future(_partition(c, victim, rec.primary)))
    after = c.nodes[other].emap.get("vol-t", 0)
    assert after is not None and victim not in after.replicas, "the cut member was not dropped"
    return work


async def test_reads_stay_linearizable_when_an_access_point_is_partitioned(
    cluster: Cluster,
) -> None:
    work = await _partition_run(cluster, leases=True)
    acked = [op for op in work.history if op.kind == "write" and op.end < math.inf]
    assert work.reads() > 100 and len(acked) > 20, "too little traffic to prove anything"
    assert anomalies(work.history) == []


async def test_reads_stay_linearizable_when_the_primary_is_killed(cluster: Cluster) -> None:
    rec = await _record(cluster)
    survivors = [m for m in rec.replicas if m != rec.primary]
    work = Workload({ap: cluster.volume(ap) for ap in survivors})
    await work.run(asyncio.ensure_future(cluster.kill(rec.primary)))
    now = cluster.nodes[survivors[0]].emap.get("vol-t", 0)
    assert now is not None and now.primary in survivors, "no failover happened"
    assert work.reads() > 100
    assert anomalies(work.history) == []


async def test_negative_control_without_read_leases_the_checker_finds_stale_reads(
    cluster: Cluster,
) -> None:
    work = await _partition_run(cluster, leases=False)
    found = anomalies(work.history)
    assert found, "read leases off, yet no stale read: the checker (or the fault) proves nothing"
    assert all(a.startswith("stale read") for a in found), found[:3]


def test_the_checker_itself() -> None:
    """Table: what the register model allows."""
    w1 = Op("write", 0, 1, 0.0, 1.0)
    w2 = Op("write", 0, 2, 2.0, 3.0)
    pending = Op("write", 0, 3, 4.0)  # never acknowledged
    ok = [
        Op("read", 0, 0, 0.0, 0.5),  # before anything was acknowledged
        Op("read", 0, 1, 0.5, 0.6),  # concurrent with w1
        Op("read", 0, 1, 2.5, 2.6),  # concurrent with w2: the old value still allowed
        Op("read", 0, 2, 3.5, 3.6),
        Op("read", 0, 2, 5.0, 5.1),  # the unfinished write may not have happened
        Op("read", 0, 3, 5.0, 5.1),  # or may have
    ]
    assert anomalies([w1, w2, pending, *ok]) == []
    bad = [
        Op("read", 0, 1, 3.5, 3.6),  # w2 was acknowledged before it began
        Op("read", 0, 0, 1.5, 1.6),  # w1 was
        Op("read", 0, 3, 0.0, 3.9),  # w3 had not started when it returned
        Op("read", 0, 9, 0.0, 1.0),  # nobody wrote 9
    ]
    assert len(anomalies([w1, w2, pending, *bad])) == 4


@pytest.mark.parametrize("value", [0, 1, 2**63])
def test_blocks_round_trip(value: int) -> None:
    assert decode(encode(value)) == value
