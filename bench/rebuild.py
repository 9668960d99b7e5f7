"""Recovery of a 3-replica volume on a dev cluster: catch-up of a member that was briefly
away, and re-replication of a lost replica with a foreground load running.

- Catch-up: chunk3 is SIGKILLed, 4 KiB random writes go on through chunk1 for `outage`
  seconds (they drop chunk3 from the replica sets they touch), chunk3 comes back: the time and
  the bytes until every extent names it again (only the changed blocks are copied).
- Re-replication: chunk3 is SIGKILLed, its extents wiped and it is started again with the
  same identity (a replaced disk); the cluster copies its replicas back (throttled by the
  chunk servers' `rebuild_rate`) while a 4 KiB random-read load runs through chunk1. Every
  replica chunk3 held of a multi-replica extent, of every volume on the cluster, is waited
  for (a 1-replica extent on chunk3 is lost with its disk: nothing can copy it back). The
  copy rate is compared with the disk's own O_DIRECT write bandwidth (bench/machine.py), the
  foreground IOPS with the same load just before the loss. Two rates: end to end (from
  chunk3's start until every replica is back: its start-up, the primaries dropping it, the
  copies, the joins' commits) and the copy alone (from the last poll before the first byte
  was counted to the first poll that saw the final count: polls every `POLL` s, so the
  window is at most 2 polls too long, never too short).

Both loads come from bench/iscsi_load.c (time-bounded, which a rebuild of unknown length needs).
The cluster must run with a short repair interval (`REBUILD_ENV`).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import iscsi_load
from bench.systems.devcluster import DevCluster, Volume

VICTIM = "chunk3"
ACCESS_POINT = "chunk1"
SOURCES = ("chunk1", "chunk2")
REBUILD_RATE = 256 << 20
# the chunk servers read these from the environment (docs/operations.md)
REBUILD_ENV = {"LUNASTOR_REBUILD_RATE": str(REBUILD_RATE), "LUNASTOR_REPAIR_INTERVAL": "0.5"}
RANDOM_WRITE = iscsi_load.Load(write=True, random=True, block=4096, depth=32)
RANDOM_READ = iscsi_load.Load(write=False, random=True, block=4096, depth=32)
TIMEOUT = 1800  # a recovery that takes longer has failed
POLL = 0.25  # seconds between the re-replication's progress samples


@dataclass(frozen=True)
class CatchUp:
    outage_s: float
    writes: int
    seconds: float
    bytes: float


@dataclass(frozen=True)
class Rereplication:
    replicas: int
    seconds: float
    bytes: float
    mbps: float
    disk_mbps: float
    fg_before_iops: float
    fg_during_iops: float
    left_s: float = 0.0  # from chunk3's start until no extent named it (dropped by each)
    copy_s: float = 0.0  # the copy alone (see the module's docstring)

    @property
    def x_disk(self) -> float:
        return self.mbps / self.disk_mbps if self.disk_mbps else 0.0

    @property
    def copy_mbps(self) -> float:
        return self.bytes / self.copy_s / 1e6 if self.copy_s else 0.0

    @property
    def copy_x_disk(self) -> float:
        return self.copy_mbps / self.disk_mbps if self.disk_mbps else 0.0

    @property
    def fg_ratio(self) -> float:
        return self.fg_during_iops / self.fg_before_iops if self.fg_before_iops else 0.0

    def to_json(self) -> dict[str, float]:
        return {
            **asdict(self),
            "x_disk": self.x_disk,
            "fg_ratio": self.fg_ratio,
            "copy_mbps": self.copy_mbps,
            "copy_x_disk": self.copy_x_disk,
        }


def rebuilt_bytes(cluster: DevCluster) -> float:
    return sum(cluster.metric(n, "lunastor_rebuild_bytes_total") for n in SOURCES)


def wait_until(done: Callable[[], bool], what: str, every: float = 0.5) -> float:
    """Poll `done()` every `every` s; seconds it took. A poll that fails (etcd slow to answer
    on a loaded machine) counts as not done yet; RuntimeError with the last failure after
    TIMEOUT."""
    start = time.monotonic()
    last: Exception | None = None
    while True:
        try:
            if done():
                return time.monotonic() - start
        except Exception as exc:
            last = exc
        if time.monotonic() - start > TIMEOUT:
            raise RuntimeError(f"{what} did not finish within {TIMEOUT} s (last error: {last!r})")
        time.sleep(every)


def catch_up(cluster: DevCluster, client: Path, volume: Volume, outage: float) -> CatchUp:
    victim_id = cluster.chunk_id(VICTIM)
    copied0 = rebuilt_bytes(cluster)
    cluster.stop(VICTIM, kill=True)
    url = volume.url(cluster.portal(ACCESS_POINT))
    written = iscsi_load.run(client, url, RANDOM_WRITE, outage, volume.size)
    cluster.start(VICTIM)
    seconds = wait_until(
        lambda: all(
            victim_id in e.replicas and not e.converging for e in cluster.extents(volume.id)
        ),
        "catch-up",
    )
    return CatchUp(
        outage_s=outage, writes=written.ios, seconds=seconds, bytes=rebuilt_bytes(cluster) - copied0
    )


def rereplicate(
    cluster: DevCluster, client: Path, volume: Volume, seconds: float, disk_mbps: float
) -> Rereplication:
    url = volume.url(cluster.portal(ACCESS_POINT))
    before = iscsi_load.run(client, url, RANDOM_READ, seconds, volume.size)
    victim_id = cluster.chunk_id(VICTIM)
    lost = {  # every replica chunk3 holds that another member can copy back
        (e.volume, e.index): e.gen
        for e in cluster.extents()
        if victim_id in e.replicas and len(e.replicas) > 1
    }
    cluster.stop(VICTIM, kill=True)
    shutil.rmtree(cluster.dir / "data" / VICTIM / "extents")
    copied0 = rebuilt_bytes(cluster)
    started = time.monotonic()
    cluster.start(VICTIM)
    stop = threading.Event()
    samples: list[tuple[float, float]] = []  # (seconds since the start, bytes copied so far)
    left: list[float] = []  # when no lost extent named chunk3 any more (once)
    runs: list[iscsi_load.LoadResult] = []
    errors: list[BaseException] = []

    def foreground() -> None:
        try:
            while not stop.is_set():
                runs.append(iscsi_load.run(client, url, RANDOM_READ, min(seconds, 5), volume.size))
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    def refilled() -> bool:
        # back on chunk3 after its removal (gen + 1) and re-addition (gen + 1); an extent no
        # longer in etcd (a deleted volume's, collected) needs nothing
        at = time.monotonic() - started
        samples.append((at, rebuilt_bytes(cluster) - copied0))
        now = {(e.volume, e.index): e for e in cluster.extents()}
        if not left and all(
            (e := now.get(key)) is None or e.gen >= gen + 1 for key, gen in lost.items()
        ):
            left.append(at)
        return all(
            (e := now.get(key)) is None
            or (victim_id in e.replicas and e.gen >= gen + 2 and not e.converging)
            for key, gen in lost.items()
        )

    worker = threading.Thread(target=foreground)
    worker.start()
    try:
        took = wait_until(refilled, "re-replication", POLL)
    finally:
        stop.set()
        worker.join()
    if errors:
        raise RuntimeError(f"foreground load during re-replication: {errors[0]}")
    copied = rebuilt_bytes(cluster) - copied0
    fg = sum(r.ios for r in runs) / max(1e-9, sum(r.seconds for r in runs))
    final = samples[-1][1] if samples else 0.0
    first = next((i for i, (_, b) in enumerate(samples) if b > 0), None)
    copy_s = 0.0
    if first is not None:
        begin = samples[first - 1][0] if first else 0.0
        end = next(t for t, b in samples if b >= final)
        copy_s = max(end - begin, POLL)
    return Rereplication(
        replicas=len(lost),
        seconds=took,
        bytes=copied,
        mbps=copied / took / 1e6,
        disk_mbps=disk_mbps,
        fg_before_iops=before.iops,
        fg_during_iops=fg,
        left_s=left[0] if left else took,
        copy_s=copy_s,
    )


def lines(cu: CatchUp | None, rr: Rereplication | None, volume_size: int) -> list[str]:
    out = []
    if cu is not None:
        out.append(
            f"catch-up of {VICTIM} after a {cu.outage_s:.0f} s outage with {cu.writes:,} random "
            f"4 KiB writes ({cu.writes * 4096 / 1e6:.1f} MB): {cu.bytes / 1e6:.1f} MB copied in "
            f"{cu.seconds:.1f} s (the volume holds {volume_size / 1e6:.0f} MB)"
        )
    if rr is not None:
        out.append(
            f"re-replication of {VICTIM}'s {rr.replicas} replicas ({rr.bytes / 1e6:.0f} MB copied, "
            f"every volume): {rr.mbps:.1f} MB/s end to end "
            f"= {rr.x_disk:.2f}x the disk's {rr.disk_mbps:.0f} MB/s O_DIRECT write bandwidth "
            f"(rebuild_rate {REBUILD_RATE >> 20} MiB/s)"
        )
        out.append(
            f"  of its {rr.seconds:.1f} s: {rr.left_s:.1f} s until {VICTIM} (started again) was "
            f"out of every replica set; the copy alone {rr.copy_s:.1f} s = {rr.copy_mbps:.1f} MB/s "
            f"= {rr.copy_x_disk:.2f}x the disk"
        )
        out.append(
            f"foreground 4 KiB random read QD32 through {ACCESS_POINT} during it: "
            f"{rr.fg_during_iops:,.0f} IOPS = {rr.fg_ratio:.2f}x the {rr.fg_before_iops:,.0f} "
            "just before the loss (bench/iscsi_load.c)"
        )
    return out
