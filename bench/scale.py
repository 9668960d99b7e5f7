"""Metadata at scale: a 1,000-server, 1 PiB, 1,000,000-LUN cluster, measured on a slice.

    python -m bench.scale [--volumes 2000] [--extents-per-volume 16] [--servers 1000]

Writing 16.8 million extent records into etcd would take hours on this machine, so the bench
writes a **representative slice** into a real etcd, exactly as the product writes it
(`VolumeRecord`, name, `LunRecord` per volume, as a create does; each volume's extents,
placed by a ring of `--servers` servers, allocated through the extent map's own transaction,
`lunastor.common.extent_pages.commit`: pages of 64 extents plus the reverse index), measures
it, and **extrapolates linearly** to the full cluster, saying so on every extrapolated line:

- etcd bytes per allocated 64 MiB extent and per volume (etcd's own dbSizeInUse after a
  compaction and defragmentation, over the slice);
- time to list (all volumes, all extents) and to plan (ring build for the servers; one
  rebalancing pass after one server joins);
- placement balance: every server against its fair share in the ring's table and in the
  slice's extents;
- the keys each chunk server watches: measured by starting the chunk server's own watch
  (`PageWatch`: its reverse-index shards and the pages of the volumes they name) for a
  sample of servers of the slice, and for the full cluster by the placement model it
  checks against the slice (1 GiB volumes on independently hashed extents);
- the largest cluster that fits etcd's 8 GB database ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time
from collections import Counter
from typing import Any

from lunastor.chunk.replication.pagewatch import PageWatch
from lunastor.common.etcd import Etcd, EtcdConfig, Put
from lunastor.common.extent_pages import (
    PAGE_EXTENTS,
    SHARD_BUCKETS,
    Change,
    commit,
    encode_shard,
    extent_records,
)
from lunastor.common.records import ExtentRecord, Keys, LunRecord, VolumeRecord
from lunastor.meta.placement import Candidate, build_ring, fair_shares, replica_count_by_server
from lunastor.meta.rebalance_plan import Holder, plan_moves
from tests.support.etcd import EtcdServer

PIB = 1 << 50
GIB = 1 << 30
EXTENT = 64 << 20
FULL_EXTENTS = PIB // EXTENT  # 16,777,216
FULL_LUNS = 1_000_000
ETCD_CEILING = 8 * 10**9
ZONES = 10
REPLICAS = 3


def status(endpoint: str) -> dict[str, Any]:
    out = subprocess.run(
        ["etcdctl", f"--endpoints={endpoint}", "endpoint", "status", "-w", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)[0]["Status"]


def settle(endpoint: str) -> int:
    """Compact to the current revision and defragment; etcd's bytes in use then."""
    rev = status(endpoint)["header"]["revision"]
    subprocess.run(
        ["etcdctl", f"--endpoints={endpoint}", "compact", str(rev), "--physical"],
        capture_output=True,
        check=True,
    )
    subprocess.run(
        ["etcdctl", f"--endpoints={endpoint}", "defrag"], capture_output=True, check=True
    )
    return int(status(endpoint)["dbSizeInUse"])


async def write(etcd: Etcd, puts: list[Put]) -> None:
    for i in range(0, len(puts), 120):
        await etcd.txn([], list(puts[i : i + 120]))


def servers(n: int) -> list[Candidate]:
    return [
        Candidate(f"chunk-{i:012x}", f"zone{i % ZONES}", 1 << 40, 1 << 40, "up") for i in range(n)
    ]


async def run(volumes: int, per_volume: int, n_servers: int) -> None:
    server = EtcdServer().start()
    try:
        config = EtcdConfig(endpoints=[server.endpoint], namespace="/lunastor")
        async with await Etcd.connect(config) as etcd:
            await measure(etcd, server.endpoint, volumes, per_volume, n_servers)
    finally:
        server.cleanup()


async def measure(etcd: Etcd, endpoint: str, volumes: int, per_volume: int, n_servers: int) -> None:
    slice_extents = volumes * per_volume
    scale_ext = FULL_EXTENTS / slice_extents
    scale_vol = FULL_LUNS / volumes
    cands = servers(n_servers)
    pp = 16
    t = time.perf_counter()
    ring = build_ring(cands, REPLICAS, pp)
    ring_s = time.perf_counter() - t
    ring_bytes = len(json.dumps(ring.to_dict()))

    empty = settle(endpoint)
    vol_puts: list[Put] = []
    for v in range(volumes):
        target, lun = divmod(v, 255)
        rec = VolumeRecord(
            id=f"vol-{v:016x}", name=f"pvc-{v:08d}", size_bytes=per_volume * EXTENT,
            created_at=time.time(), target=target, lun=lun + 1,
        )  # fmt: skip
        acl = LunRecord(rec.id, ["iqn.2026-01.io.k8s:node-1"])
        vol_puts += [
            Put(Keys.volume(rec.id), rec.to_json()),
            Put(Keys.volume_name(rec.name), rec.id.encode()),
            Put(Keys.lun(target, lun + 1), acl.to_json()),
        ]
    await write(etcd, vol_puts)
    with_volumes = settle(endpoint)
    extents = []
    allocations: list[list[Change]] = []
    for v in range(volumes):
        vid = f"vol-{v:016x}"
        changes = []
        for i in range(per_volume):
            ext = ExtentRecord(volume=vid, index=i, gen=1, replicas=ring.place(vid, i), copies=3)
            extents.append(ext)
            changes.append(Change(vid, i, None, ext))
        for at in range(0, len(changes), 16):  # <= 128 ops a txn: 1 page, <= 48 shards
            allocations.append(changes[at : at + 16])
    t = time.perf_counter()
    await allocate(etcd, allocations)
    alloc_s = time.perf_counter() - t
    with_extents = settle(endpoint)
    page_keys = len((await etcd.get_prefix(Keys.EXTENTS))[0])
    index_keys, _ = await etcd.get_prefix(Keys.CHUNK_EXTENTS)
    shards_per_server = Counter(kv.key.split("/")[3] for kv in index_keys)
    # an even sample of every server (those holding nothing too), and the busiest ones
    sample = [c.id for c in cands[:: max(1, n_servers // 40)]]
    watched = await watched_keys(etcd, sample)
    busiest = await watched_keys(etcd, [s for s, _ in shards_per_server.most_common(5)])
    per_volume_bytes = (with_volumes - empty) / volumes
    slice_extent_bytes = (with_extents - with_volumes) / slice_extents
    # The slice's reverse index is sparse (~1 extent per shard key); the full cluster's is
    # dense. So: the pages as measured, plus the index measured at the full cluster's density.
    await etcd.delete_prefix(Keys.CHUNK_EXTENTS)
    pages_only = settle(endpoint)
    page_bytes = (pages_only - with_volumes) / slice_extents
    per_shard = round(REPLICAS * FULL_EXTENTS / n_servers / SHARD_BUCKETS)
    dense = await dense_index(etcd, per_shard, servers=4)
    membership_bytes = (settle(endpoint) - pages_only) / dense
    await etcd.delete_prefix(Keys.CHUNK_EXTENTS)
    per_extent_bytes = page_bytes + REPLICAS * membership_bytes

    t = time.perf_counter()
    listed, _ = await etcd.get_prefix(Keys.VOLUMES)
    [VolumeRecord.from_json(kv.value) for kv in listed]
    list_vol_s = time.perf_counter() - t
    t = time.perf_counter()
    listed_ext, _ = await etcd.get_prefix(Keys.EXTENTS)
    assert len(extent_records(listed_ext)) == slice_extents
    list_ext_s = time.perf_counter() - t

    # balance: the ring's table and the slice's extents against the fair shares
    shares = fair_shares(cands, REPLICAS, pp)
    table = replica_count_by_server(ring)
    table_worst = max(abs(table[s] - f) / f for s, f in shares.items())
    counts = Counter(m for e in extents for m in e.replicas)
    total = sum(counts.values())
    slots = REPLICAS * ring.partitions
    extent_worst = max(
        abs(counts.get(s, 0) - f * total / slots) / (f * total / slots) for s, f in shares.items()
    )

    # planning: one more server joins (zone0); rebuild the ring, then one rebalance pass
    joined = [*cands, Candidate(f"chunk-{n_servers:012x}", "zone0", 1 << 40, 1 << 40, "up")]
    t = time.perf_counter()
    build_ring(joined, REPLICAS, pp, previous=ring)
    rebuild_s = time.perf_counter() - t
    holders = [Holder(c.id, c.zone, c.capacity) for c in joined]
    t = time.perf_counter()
    plan = plan_moves(extents, holders, max_moves=1000, max_per_server=1000)
    plan_s = time.perf_counter() - t

    per_full = per_extent_bytes * FULL_EXTENTS + per_volume_bytes * FULL_LUNS
    fits_extents = (ETCD_CEILING - per_volume_bytes * FULL_LUNS) / per_extent_bytes
    page_keys_full = page_keys * scale_ext
    # A server holds a volume's family if it is a member of any of its extents: with
    # replicas placed per extent by hash, 1 - (1 - R/n)^extents of the volumes.
    p_family = 1 - (1 - REPLICAS / n_servers) ** per_volume
    model_slice = volumes * p_family
    pages_per_family = -(-per_volume // PAGE_EXTENTS)
    families_full = FULL_LUNS * p_family
    extent_keys_full = families_full * pages_per_family + SHARD_BUCKETS
    mean_families = sum(f for _, f in watched) / max(1, len(watched))
    print(
        f"\nslice: {volumes} volumes x {per_volume} extents of 64 MiB = {slice_extents} "
        f"extents ({slice_extents * EXTENT / 2**40:.1f} TiB) on a ring of {n_servers} servers "
        f"in {ZONES} zones, part power {pp}, {REPLICAS} replicas, in a real etcd"
    )
    print(
        "lines marked (x) are extrapolated linearly from the slice to 1 PiB "
        f"({FULL_EXTENTS:,} extents) and {FULL_LUNS:,} LUNs"
    )
    rows = [
        (
            "(x) etcd bytes per allocated extent (goal < 100)",
            f"{per_extent_bytes:.0f} B: page {page_bytes:.0f} B + {REPLICAS} x "
            f"{membership_bytes:.1f} B in reverse-index shards of {per_shard} extents",
        ),
        (
            "etcd bytes per extent in the slice itself",
            f"{slice_extent_bytes:.0f} B (its index is sparse: ~1 extent per shard key)",
        ),
        ("etcd bytes per volume (record, name, LUN + ACL)", f"{per_volume_bytes:.0f} B"),
        (
            "extent map keys in the slice",
            f"{page_keys} pages, {len(index_keys)} reverse-index shards",
        ),
        (
            f"allocate the slice's extents ({len(allocations)} txns, 8 at a time)",
            f"{alloc_s:.1f} s",
        ),
        ("(x) etcd database for the full cluster", f"{per_full / 1e9:.1f} GB"),
        (
            "(x) largest cluster within 8 GB",
            f"{fits_extents * EXTENT / PIB:.2f} PiB "
            f"({fits_extents:,.0f} extents) with {FULL_LUNS:,} volumes",
        ),
        ("ring JSON (one etcd key)", f"{ring_bytes / 1e6:.2f} MB"),
        (
            f"list {volumes} volumes / (x) {FULL_LUNS:,}",
            f"{list_vol_s * 1000:.0f} ms / {list_vol_s * scale_vol:.0f} s",
        ),
        (
            f"list {slice_extents} extents / (x) all",
            f"{list_ext_s * 1000:.0f} ms / {list_ext_s * scale_ext:.0f} s",
        ),
        (f"plan: build the ring, {n_servers} servers", f"{ring_s:.1f} s"),
        ("plan: rebuild it after one server joins", f"{rebuild_s:.1f} s"),
        (
            f"plan: one rebalance pass over the slice, {len(plan.moves)} moves",
            f"{plan_s:.2f} s ({plan_s / max(1, len(plan.moves)) * 1000:.1f} ms a move)",
        ),
        ("balance: ring table, worst server off its fair share", f"{table_worst:.2%}"),
        ("balance: the slice's extents, worst server", f"{extent_worst:.2%}"),
        (
            f"keys a chunk server watches in the slice ({len(watched)} servers evenly "
            "sampled, their PageWatch started)",
            f"mean {sum(k for k, _ in watched) / max(1, len(watched)):.1f} (shards + pages); "
            f"volumes loaded: mean {mean_families:.1f}, model {model_slice:.1f}",
        ),
        (
            "the same, the 5 servers with most shards",
            f"max {max((k for k, _ in busiest), default=0)} keys, "
            f"{max((f for _, f in busiest), default=0)} volumes",
        ),
        (
            "(x) extent-map keys each chunk server watches, full cluster",
            f"{extent_keys_full:,.0f} ({families_full:,.0f} volumes x {pages_per_family} "
            f"page + {SHARD_BUCKETS} shards; was {page_keys_full:,.0f}: every page)",
        ),
        (
            "(x) other keys it still watches in full",
            f"{FULL_LUNS:,} (/v1/volumes/: epochs, zones, the snapshot fence)",
        ),
        (
            "its own reverse-index shards (what it holds), worst server",
            f"{max(shards_per_server.values(), default=0)} keys (of at most {SHARD_BUCKETS})",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


async def watched_keys(etcd: Etcd, chunks: list[str]) -> list[tuple[int, int]]:
    """(keys watched, volumes loaded) by each chunk server's own watch of the extent map."""
    out = []
    for chunk in chunks:
        watch = await PageWatch(etcd, chunk).start()
        try:
            out.append((watch.watched_keys(), len(watch.families())))
        finally:
            await watch.stop()
    return out


async def dense_index(etcd: Etcd, per_shard: int, servers: int) -> int:
    """Reverse-index shards as full as the whole cluster's: every shard of `servers` servers
    listing `per_shard` extents of distinct volumes. The number of memberships written."""
    puts = []
    for s in range(servers):
        for bucket in range(SHARD_BUCKETS):
            held = {
                f"vol-{(s << 40) + (bucket << 20) + k:016x}": {k % 16} for k in range(per_shard)
            }
            key = f"{Keys.chunk_extents(f'chunk-{s:012x}')}{bucket:03x}"
            puts.append(Put(key, encode_shard(held)))
    await write(etcd, puts)
    return servers * SHARD_BUCKETS * per_shard


async def allocate(etcd: Etcd, allocations: list[list[Change]], parallel: int = 8) -> None:
    """Every allocation through the extent map's transaction, `parallel` at a time."""
    queue = list(reversed(allocations))

    async def worker() -> None:
        while queue:
            changes = queue.pop()
            if await commit(etcd, changes) is None:
                raise RuntimeError(f"allocating {changes[0]} lost: nothing else writes here")

    await asyncio.gather(*(worker() for _ in range(parallel)))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    parser.add_argument("--volumes", type=int, default=2000)
    parser.add_argument("--extents-per-volume", type=int, default=16, help="1 GiB volumes")
    parser.add_argument("--servers", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(run(args.volumes, args.extents_per_volume, args.servers))


if __name__ == "__main__":
    main()
