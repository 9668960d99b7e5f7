"""Snapshots and clones on a dev cluster: time and bytes (docs/snapshots.md).

    python -m bench.snapshots [--dir DIR] [--extents 4] [--rounds 5]

Starts a dev cluster (3 chunk servers, 3 replicas, 64 MiB extents) unless `--dir` names a
running one (`make bench` passes its own), fills a volume with random data through qemu-img,
then measures:

* snapshot create and clone create through the REST API (median latency; etcd bytes the
  transaction writes, read back from etcd);
* the first 4 KiB write to each extent after a snapshot (the copy-on-write: every replica
  copies the extent locally before the write is applied) against the next write to the same
  extent (a normal write), both timed by qemu-io in one iSCSI session;
* the bytes the copies take on disk (on XFS/btrfs copy_file_range shares blocks: ~0).

The anchor is the normal write: the COW write's cost is reported as a ratio to it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.qemu_img import fill
from bench.systems.devcluster import DevCluster, dev_cluster
from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.records import Keys

MIB = 1 << 20


def etcd_sizes(state: dict[str, Any], keys: list[str]) -> int:
    async def read() -> int:
        cfg = EtcdConfig(endpoints=state["etcd"]["endpoints"], namespace=state["etcd"]["namespace"])
        async with await Etcd.connect(cfg) as etcd:
            total = 0
            for key in keys:
                kv = await etcd.get(key)
                total += len(key) + (len(kv.value) if kv else 0)
            return total

    return asyncio.run(read())


def used_on_disk(directory: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(directory / "data"):
        for n in names:
            if dirpath.endswith("data") or "extents" not in dirpath:
                continue
            total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
    return total


def qemu_io_times(image_opts: str, commands: list[str]) -> list[float]:
    """Seconds each qemu-io command took, as qemu-io reports them."""
    argv = ["qemu-io", "--image-opts"]
    for c in commands:
        argv += ["-c", c]
    out = subprocess.run([*argv, image_opts], capture_output=True, text=True, check=True).stdout
    times = []
    for m in re.finditer(r"ops; (?:(\d+):(\d+):(\d+\.\d+)|(\d+\.\d+) sec)", out):
        if m.group(4):
            times.append(float(m.group(4)))
        else:
            h, mi, s = int(m.group(1)), int(m.group(2)), float(m.group(3))
            times.append(h * 3600 + mi * 60 + s)
    if len(times) != len(commands):
        raise SystemExit(f"qemu-io: expected {len(commands)} timings:\n{out}")
    return times


def run(cluster: DevCluster, extents: int, rounds: int) -> None:
    state, api, directory = cluster.state, cluster.api, cluster.dir
    size = extents * 64 * MIB
    vol = cluster.create_volume("bench-src", size, 3)
    opts = vol.image_opts(cluster.portal(cluster.chunk_names()[0]))
    with tempfile.NamedTemporaryFile() as image:
        image.write(os.urandom(size))
        image.flush()
        took = fill(image.name, opts)
    print(f"filled {size // MIB} MiB ({extents} extents x 3 replicas) in {took:.1f} s")

    snap_ms, clone_ms, cow, normal = [], [], [], []
    snap_bytes = clone_bytes = 0
    copied = 0
    for r in range(rounds):
        start = time.perf_counter()
        snap = api.request("POST", "/v1/snapshots", {"name": f"bench-s{r}", "volume_id": vol.id})
        snap_ms.append((time.perf_counter() - start) * 1000)
        snap_bytes = etcd_sizes(
            state,
            [Keys.snapshot(snap["id"]), Keys.snapshot_name(snap["name"]), Keys.volume(vol.id)],
        )
        start = time.perf_counter()
        clone = api.request(
            "POST",
            "/v1/volumes",
            {"name": f"bench-c{r}", "size_bytes": size, "source": {"snapshot_id": snap["id"]}},
        )
        clone_ms.append((time.perf_counter() - start) * 1000)
        clone_bytes = etcd_sizes(
            state,
            [
                Keys.volume(clone["id"]),
                Keys.volume_name(clone["name"]),
                Keys.lun(int(clone["target_iqn"].rsplit("-", 1)[1]), clone["lun"]),
            ],
        )
        before = used_on_disk(directory)
        # per extent: the first write after the snapshot copies, the second does not
        commands = [
            f"write -P {r + 1} {k * 64 * MIB + (2 * i) * 4096} 4k"
            for k in range(extents)
            for i in (0, 1)
        ]
        times = qemu_io_times(opts, commands)
        cow += times[0::2]
        normal += times[1::2]
        copied += used_on_disk(directory) - before

    def ms(xs: list[float]) -> str:
        lo, hi = min(xs) * 1000, max(xs) * 1000
        return f"{statistics.median(xs) * 1000:8.1f} ms (min {lo:.1f}, max {hi:.1f})"

    print(
        f"snapshot create (REST, incl. data-path fence) {statistics.median(snap_ms):8.1f} ms, "
        f"{snap_bytes} B in etcd"
    )
    print(
        f"clone create (REST)                           {statistics.median(clone_ms):8.1f} ms, "
        f"{clone_bytes} B in etcd"
    )
    print(f"first 4 KiB write after a snapshot (COW)      {ms(cow)}")
    print(f"next 4 KiB write, same extent (normal)        {ms(normal)}")
    # qemu-io prints its timings to 10 ms: a normal 4 KiB write often reads as 0
    if statistics.median(normal) > 0:
        ratio = statistics.median(cow) / statistics.median(normal)
        print(f"COW / normal                                  {ratio:8.1f}x")
    else:
        print("COW / normal                                  n/a (normal below qemu-io's 10 ms)")
    per = copied / (rounds * extents)
    print(
        f"disk used by the copies                       {per / MIB:8.1f} MiB per extent "
        "(3 replicas; ~0 with reflinks)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.snapshots", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--dir", type=Path, help="a running dev cluster (default: start one)")
    parser.add_argument("--extents", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.dir is not None:
        run(DevCluster(args.dir), args.extents, args.rounds)
        return 0
    with (
        tempfile.TemporaryDirectory(prefix="lunastor-bench-") as tmp,
        dev_cluster(Path(tmp) / "dev") as cluster,
    ):
        run(cluster, args.extents, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
