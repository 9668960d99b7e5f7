"""The noisy-neighbour line (issue 18): does one volume keep its latency when another volume
on the same chunk servers is flooded?

Volume A runs QD1 4 KiB random writes (a database's commits) alone, then while volume B takes
a QD32 4 KiB random-write flood through the same access point, B unlimited, then B limited by
per-volume QoS (docs/qos.md) to `LIMIT_SHARE` of the write IOPS it reached unlimited (so the
line means the same on a fast and a slow machine), set online through the REST API. Both
volumes have 3 replicas on the 3 chunk servers of the dev cluster. The client is
bench/iscsi_load.c, which records every request's latency: A's p50 and p99 are compared
(qemu-img bench reports no percentiles).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import iscsi_load
from bench.systems.devcluster import DevCluster, Volume

ACCESS_POINT = "chunk1"
VICTIM_LOAD = iscsi_load.Load(write=True, random=True, block=4096, depth=1)
FLOOD = iscsi_load.Load(write=True, random=True, block=4096, depth=32)
SIZE = 256 << 20
FLOOD_HEAD_START = 1.0  # seconds the flood runs before A is measured
LIMIT_SHARE = 0.1  # B's limit: this share of the write IOPS it reached unlimited
MIN_LIMIT = 10  # write IOPS, at least


@dataclass(frozen=True)
class NextTo:
    """A's latency next to B's flood, and what B did."""

    a_p50_us: float
    a_p99_us: float
    b_iops: float


@dataclass(frozen=True)
class Noisy:
    alone_p50_us: float
    alone_p99_us: float
    unlimited: NextTo
    limited: NextTo | None  # None: B could not be limited
    b_limit_iops: int = 0  # B's write IOPS limit in the limited run

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def limit_volume(cluster: DevCluster, volume: Volume, write_iops: int) -> bool:
    """Limit `volume`'s writes to `write_iops` online (REST PATCH, docs/qos.md)."""
    got = cluster.api.request(
        "PATCH", f"/v1/volumes/{volume.id}", {"qos": {"write_iops": write_iops}}
    )
    return bool(got["qos"].get("write_iops") == write_iops)


def next_to_flood(client: Path, a_url: str, b_url: str, seconds: float) -> NextTo:
    flood = iscsi_load.start(client, b_url, FLOOD, seconds + 2 * FLOOD_HEAD_START, SIZE)
    try:
        time.sleep(FLOOD_HEAD_START)
        a = iscsi_load.run(client, a_url, VICTIM_LOAD, seconds, SIZE)
    finally:
        b = iscsi_load.finish(flood, seconds + 2 * FLOOD_HEAD_START)
    return NextTo(a_p50_us=a.p50_us, a_p99_us=a.p99_us, b_iops=b.iops)


def measure(cluster: DevCluster, client: Path, seconds: float) -> Noisy:
    a = cluster.create_volume("bench-noisy-a", SIZE, 3)
    b = cluster.create_volume("bench-noisy-b", SIZE, 3)
    portal = cluster.portal(ACCESS_POINT)
    a_url, b_url = a.url(portal), b.url(portal)
    for url in (a_url, b_url):  # allocate the extents first: first writes are not the subject
        iscsi_load.run(client, url, FLOOD, 1, SIZE)
    alone = iscsi_load.run(client, a_url, VICTIM_LOAD, seconds, SIZE)
    unlimited = next_to_flood(client, a_url, b_url, seconds)
    limit = max(MIN_LIMIT, int(unlimited.b_iops * LIMIT_SHARE))
    limited = (
        next_to_flood(client, a_url, b_url, seconds) if limit_volume(cluster, b, limit) else None
    )
    return Noisy(
        alone_p50_us=alone.p50_us,
        alone_p99_us=alone.p99_us,
        unlimited=unlimited,
        limited=limited,
        b_limit_iops=limit if limited is not None else 0,
    )


def measures(n: Noisy) -> dict[str, float]:
    out = {
        "noisy.alone_p99_us": n.alone_p99_us,
        "noisy.unlimited_x_alone": n.unlimited.a_p99_us / n.alone_p99_us,
    }
    if n.limited is not None:
        out["noisy.limited_x_alone"] = n.limited.a_p99_us / n.alone_p99_us
    return out


def lines(n: Noisy) -> list[str]:
    def row(label: str, x: NextTo | None) -> str:
        if x is None:
            return f"  {label:34} n/a (B could not be limited)"
        return (
            f"  {label:34} p50 {x.a_p50_us:>8,.0f} us  p99 {x.a_p99_us:>8,.0f} us "
            f"({x.a_p99_us / n.alone_p99_us:.2f}x alone); B {x.b_iops:,.0f} IOPS"
        )

    return [
        "noisy neighbour: volume A QD1 4 KiB random write, volume B QD32 4 KiB random write, "
        f"both 3 replicas, through {ACCESS_POINT} (bench/iscsi_load.c)",
        f"  {'A alone':34} p50 {n.alone_p50_us:>8,.0f} us  p99 {n.alone_p99_us:>8,.0f} us",
        row("A next to B, B unlimited", n.unlimited),
        row(f"A next to B, B limited to {n.b_limit_iops} IOPS", n.limited),
    ]
