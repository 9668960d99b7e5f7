"""A 3-replica volume of a dev cluster against tgt on one file, same client, same run.

    python -m bench.replicated [--seconds 8] [--size 512MiB] [--jobs rr4k,...] [--no-rebuild]

Starts `lunastor dev up` (etcd, meta, 3 chunk servers, redirector) in a temporary directory,
creates a volume with 3 replicas (one on every chunk server, so every access point holds a
local replica), fills it and a tgt backing file with the same random data, and runs the
load client's jobs (bench/iscsi_load.c) against both through one portal each. CPU per IO
counts every chunk server (they all work for each write) against tgtd.

Then, unless --no-rebuild: catch-up (chunk3 SIGKILLed for 10 s under random writes, then
back: time and bytes copied), the raw write bandwidth of the disk under the data directories
(dd, O_DIRECT) as the anchor, and the re-replication of a lost replica: chunk3 is SIGKILLed,
its extents wiped and it is started again with the same identity (a replaced disk); the
cluster copies its replicas back while a foreground 4 KiB random-read job runs through chunk1
(re-replication is throttled by the chunk servers' `rebuild_rate`). Prints the copy rate against the
disk's bandwidth and the foreground IOPS against the same job before the loss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.iscsi_target import (
    HERE,
    JOBS,
    Job,
    build_client,
    free_port,
    print_ratios,
    print_result,
    run_job,
    tgt_target,
)
from lunastor.cli.api import ApiClient
from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.records import ExtentRecord, Keys

LOAD_INITIATOR = "iqn.2026-11.io.lunastor:bench"  # the name bench/iscsi_load.c logs in with
LUNASTOR = [sys.executable, "-m", "lunastor.cli.main"]


def lunastor(*args: str, timeout: float = 180) -> str:
    proc = subprocess.run([*LUNASTOR, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"lunastor {' '.join(args)}: {proc.stderr.strip() or proc.stdout}")
    return proc.stdout


class DevCluster:
    """`lunastor dev up --detach` in `directory`; `down()` stops it."""

    def __init__(self, directory: Path, chunks: int = 3) -> None:
        self.dir = directory
        lunastor(
            "dev",
            "up",
            "--detach",
            "--dir",
            str(directory),
            "--chunks",
            str(chunks),
            "--address-prefix",
            f"127.{random.randint(100, 250)}",
        )
        self.state: dict[str, Any] = json.loads((directory / "cluster.json").read_text())
        self.api = ApiClient(self.state["api_url"], self.state["admin_token"], timeout=60)

    def refresh(self) -> None:
        self.state = json.loads((self.dir / "cluster.json").read_text())

    def daemon(self, name: str) -> dict[str, Any]:
        info: dict[str, Any] = self.state["daemons"][name]
        return info

    def chunk_pids(self) -> list[int]:
        self.refresh()
        return [
            int(d["pid"])
            for name, d in sorted(self.state["daemons"].items())
            if name.startswith("chunk") and d.get("pid")
        ]

    def metric(self, chunk: str, name: str) -> float:
        """Sum of every sample of metric `name` on one chunk server's /metrics."""
        admin = self.daemon(chunk)["endpoints"]["admin"]
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", re.M)
        return sum(float(v) for v in pattern.findall(text))

    def down(self) -> None:
        subprocess.run([*LUNASTOR, "dev", "down", "--dir", str(self.dir)], capture_output=True)


def fill(url_opts: str, image: Path) -> float:
    """qemu-img convert `image` into the iSCSI LUN; returns seconds."""
    start = time.monotonic()
    subprocess.run(
        ["qemu-img", "convert", "-n", "-f", "raw", str(image), "--target-image-opts", url_opts],
        check=True,
        capture_output=True,
        timeout=1800,
    )
    return time.monotonic() - start


def disk_write_mbps(directory: Path, size: int = 256 << 20) -> float:
    """Raw sequential write bandwidth of the file system under `directory` (O_DIRECT, fsync)."""
    probe = directory / "dd-probe"
    start = time.monotonic()
    subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={probe}",
            "bs=1M",
            f"count={size >> 20}",
            "oflag=direct",
            "conv=fsync",
            "status=none",
        ],
        check=True,
    )
    elapsed = time.monotonic() - start
    probe.unlink()
    return size / elapsed / 1e6


def extents(state: dict[str, Any], volume_id: str) -> list[ExtentRecord]:
    async def read() -> list[ExtentRecord]:
        cfg = EtcdConfig(endpoints=state["etcd"]["endpoints"], namespace=state["etcd"]["namespace"])
        async with await Etcd.connect(cfg) as etcd:
            kvs, _ = await etcd.get_prefix(Keys.volume_extents(volume_id))
        return [ExtentRecord.from_json(kv.value) for kv in kvs]

    return asyncio.run(read())


def rebuilt_bytes(cluster: DevCluster, servers: Sequence[str]) -> float:
    return sum(cluster.metric(n, "lunastor_rebuild_bytes_total") for n in servers)


def catchup_stage(
    cluster: DevCluster, client: Path, url: str, volume_id: str, size: int, outage: float
) -> dict[str, float]:
    """chunk3 is SIGKILLed, 4 KiB random writes go on through chunk1 for `outage` seconds
    (they drop chunk3 from the replica sets they touch), chunk3 comes back: the time and the
    bytes until every extent names it again (only the changed blocks are copied)."""
    victim = "chunk3"
    victim_id = (cluster.dir / "data" / victim / "chunk-id").read_text().strip()
    copied0 = rebuilt_bytes(cluster, ["chunk1", "chunk2"])
    lunastor("dev", "stop", victim, "--kill", "--dir", str(cluster.dir))
    job = Job("rw4k", "write", "rand", 4096, 32)
    written = run_job(client, url, job, outage, cluster.chunk_pids(), size)
    lunastor("dev", "start", victim, "--dir", str(cluster.dir))
    cluster.refresh()
    start = time.monotonic()
    deadline = start + 1800
    while not all(
        victim_id in e.replicas and not e.converging for e in extents(cluster.state, volume_id)
    ):
        if time.monotonic() > deadline:
            raise RuntimeError("catch-up did not finish within 30 minutes")
        time.sleep(0.5)
    elapsed = time.monotonic() - start
    copied = rebuilt_bytes(cluster, ["chunk1", "chunk2"]) - copied0
    return {
        "outage_s": outage,
        "writes": written["ios"],
        "written_bytes": written["ios"] * 4096,
        "seconds": elapsed,
        "bytes": copied,
    }


def rebuild_stage(
    cluster: DevCluster,
    client: Path,
    url: str,
    volume_id: str,
    size: int,
    seconds: float,
    baseline_iops: float,
) -> dict[str, float]:
    """Lose chunk3's replicas (SIGKILL, wipe its extents, restart it with the same identity:
    a replaced disk) and time their re-replication while a foreground random-read job runs
    through chunk1."""
    victim = "chunk3"
    victim_id = (cluster.dir / "data" / victim / "chunk-id").read_text().strip()
    before = {(e.index): e.gen for e in extents(cluster.state, volume_id)}
    lunastor("dev", "stop", victim, "--kill", "--dir", str(cluster.dir))
    shutil.rmtree(cluster.dir / "data" / victim / "extents")
    copied_before = rebuilt_bytes(cluster, ["chunk1", "chunk2"])
    lunastor("dev", "start", victim, "--dir", str(cluster.dir))
    cluster.refresh()
    start = time.monotonic()
    fg: dict[str, float] = {}
    stop = threading.Event()

    def foreground() -> None:
        job = Job("rr4k", "read", "rand", 4096, 32)
        runs = []
        while not stop.is_set():
            runs.append(run_job(client, url, job, min(seconds, 5), cluster.chunk_pids(), size))
        fg["iops"] = sum(r["ios"] for r in runs) / max(1e-9, sum(r["seconds"] for r in runs))

    def refilled() -> bool:
        now = extents(cluster.state, volume_id)
        return all(
            victim_id in e.replicas and e.gen >= before.get(e.index, 0) + 2 and not e.converging
            for e in now
        )

    worker = threading.Thread(target=foreground)
    worker.start()
    try:
        deadline = start + 1800
        while not refilled():
            if time.monotonic() > deadline:
                raise RuntimeError("re-replication did not finish within 30 minutes")
            time.sleep(0.5)
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        worker.join()
    copied = rebuilt_bytes(cluster, ["chunk1", "chunk2"]) - copied_before
    return {
        "seconds": elapsed,
        "bytes": copied,
        "mbps": copied / elapsed / 1e6,
        "fg_iops": fg.get("iops", 0.0),
        "fg_ratio": fg.get("iops", 0.0) / baseline_iops if baseline_iops else 0.0,
    }


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    m = re.fullmatch(r"(\d+)\s*([kmg])?i?b?", text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB)")
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--size", type=parse_size, default=512 << 20, help="volume size")
    parser.add_argument("--jobs", default=",".join(j.name for j in JOBS))
    parser.add_argument("--no-rebuild", action="store_true", help="skip re-replication")
    parser.add_argument(
        "--rebuild-rate",
        type=parse_size,
        default=256 << 20,
        help="the chunk servers' rebuild_rate (bytes/s; e.g. 256MiB)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()
    if shutil.which("tgtd") is None:
        print("tgtd is not installed: run ./scripts/setup.sh", file=sys.stderr)
        return 2
    jobs = [j for j in JOBS if j.name in args.jobs.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    client = build_client(args.out)
    results: dict[str, Any] = {"tgt": {}, "lunastor": {}}
    with tempfile.TemporaryDirectory(prefix="lunastor-bench-") as tmp:
        image = Path(tmp) / "tgt.img"
        subprocess.run(
            ["dd", "if=/dev/urandom", f"of={image}", "bs=1M", f"count={args.size >> 20}"],
            check=True,
            capture_output=True,
        )
        with tgt_target(image, free_port()) as (pid, url):
            for job in jobs:
                results["tgt"][job.name] = r = run_job(
                    client, url, job, args.seconds, [pid], args.size
                )
                print_result("tgt", job, r)
        # the chunk servers read their settings from the environment too (docs/operations.md)
        os.environ["LUNASTOR_REBUILD_RATE"] = str(args.rebuild_rate)
        os.environ["LUNASTOR_REPAIR_INTERVAL"] = "0.5"
        cluster = DevCluster(Path(tmp) / "cluster")
        try:
            volume = cluster.api.request(
                "POST",
                "/v1/volumes",
                {"name": "bench", "size_bytes": args.size, "replicas": 3},
            )
            export = cluster.api.request(
                "POST", f"/v1/volumes/{volume['id']}/exports", {"initiator": LOAD_INITIATOR}
            )
            portal = cluster.daemon("chunk1")["endpoints"]["portal"]
            target, lun = export["target_iqn"], export["lun"]
            url = f"iscsi://{portal}/{target}/{lun}"
            opts = (
                f"driver=iscsi,transport=tcp,portal={portal},target={target},lun={lun},"
                f"initiator-name={LOAD_INITIATOR}"
            )
            took = fill(opts, image)
            print(f"  filled the 3-replica volume: {args.size / took / 1e6:.1f} MB/s", flush=True)
            for job in jobs:
                results["lunastor"][job.name] = r = run_job(
                    client, url, job, args.seconds, cluster.chunk_pids(), args.size
                )
                print_result("lunastor", job, r)
            print_ratios(jobs, results["tgt"], results["lunastor"])
            if not args.no_rebuild:
                cu = catchup_stage(cluster, client, url, volume["id"], args.size, 10)
                results["catchup"] = cu
                print()
                print(
                    f"catch-up of chunk3 after a {cu['outage_s']:.0f} s outage with "
                    f"{cu['writes']:.0f} random 4 KiB writes ({cu['written_bytes'] / 1e6:.1f} MB): "
                    f"{cu['bytes'] / 1e6:.1f} MB copied in {cu['seconds']:.1f} s "
                    f"(the volume holds {args.size / 1e6:.0f} MB)"
                )
                disk = disk_write_mbps(cluster.dir / "data")
                baseline = results["lunastor"].get("rr4k", {}).get("iops", 0.0)
                rb = rebuild_stage(
                    cluster, client, url, volume["id"], args.size, args.seconds, baseline
                )
                results["rebuild"] = {**rb, "disk_mbps": disk}
                print()
                print(
                    f"re-replication of chunk3's replicas ({rb['bytes'] / 1e6:.0f} MB): "
                    f"{rb['mbps']:.1f} MB/s = {rb['mbps'] / disk:.2f}x the disk's "
                    f"{disk:.0f} MB/s (rebuild_rate {args.rebuild_rate >> 20} MiB/s); "
                    f"foreground 4K random read {rb['fg_iops']:.0f} IOPS = "
                    f"{rb['fg_ratio']:.2f}x before the loss"
                )
        finally:
            cluster.down()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (args.out / f"replicated-{stamp}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
