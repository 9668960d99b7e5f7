"""Snapshots and clones on a dev cluster: time and bytes (docs/snapshots.md).

    PYTHONPATH=. python -m bench.snapshots [--dir DIR] [--extents 4] [--rounds 5]

Starts a dev cluster (3 chunk servers, 3 replicas, 64 MiB extents) unless `--dir` names a
running one, fills a volume with random data through qemu-img, then measures:

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
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.systems.devcluster import dev_cluster
from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.records import Keys

MIB = 1 << 20
IQN = "iqn.2008-11.org.linux-kvm"  # qemu's default initiator name


class Api:
    def __init__(self, state: dict[str, Any]) -> None:
        self.url = state["api_url"]
        self.token = state["admin_token"]

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=60) as resp:
            out: dict[str, Any] = json.loads(resp.read() or b"{}")
            return out


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


def qemu_io_times(link: str, commands: list[str]) -> list[float]:
    """Seconds each qemu-io command took, as qemu-io reports them."""
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    out = subprocess.run([*argv, link], capture_output=True, text=True, check=True).stdout
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


def run(directory: Path, extents: int, rounds: int) -> None:
    state = json.loads((directory / "cluster.json").read_text())
    api = Api(state)
    portal = next(d for d in state["daemons"].values() if d["kind"] == "chunk")["endpoints"][
        "portal"
    ]
    size = extents * 64 * MIB
    vol = api.call("POST", "/v1/volumes", {"name": "bench-src", "size_bytes": size})
    api.call("POST", f"/v1/volumes/{vol['id']}/exports", {"initiator": IQN})
    link = f"iscsi://{portal}/{vol['target_iqn']}/{vol['lun']}"
    with tempfile.NamedTemporaryFile() as image:
        image.write(os.urandom(size))
        image.flush()
        start = time.perf_counter()
        subprocess.run(
            ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", image.name, link], check=True
        )
        fill = time.perf_counter() - start
    print(f"filled {size // MIB} MiB ({extents} extents x 3 replicas) in {fill:.1f} s")

    snap_ms, clone_ms, cow, normal = [], [], [], []
    snap_bytes = clone_bytes = 0
    copied = 0
    for r in range(rounds):
        start = time.perf_counter()
        snap = api.call("POST", "/v1/snapshots", {"name": f"bench-s{r}", "volume_id": vol["id"]})
        snap_ms.append((time.perf_counter() - start) * 1000)
        snap_bytes = etcd_sizes(
            state,
            [Keys.snapshot(snap["id"]), Keys.snapshot_name(snap["name"]), Keys.volume(vol["id"])],
        )
        start = time.perf_counter()
        clone = api.call(
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
        times = qemu_io_times(link, commands)
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
    ratio = statistics.median(cow) / statistics.median(normal)
    print(f"COW / normal                                  {ratio:8.1f}x")
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
        run(args.dir, args.extents, args.rounds)
        return 0
    with (
        tempfile.TemporaryDirectory(prefix="lunastor-bench-") as tmp,
        dev_cluster(Path(tmp) / "dev") as cluster,
    ):
        run(cluster.dir, args.extents, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
