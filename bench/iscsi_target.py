"""The standalone lunastor iSCSI target against tgt (the C userspace target), same file, same run.

    python -m bench.iscsi_target [--seconds 10] [--size 1GiB] [--jobs rr4k,rw4k,...]

Builds the libiscsi load client (bench/iscsi_load.c), then for each target in turn serves one
sparse file on loopback and runs every job against it, measuring the target process's CPU time
(utime + stime from /proc) to report CPU per IO. Prints a table with both targets and the ratios.
At high IOPS the client itself may saturate a core first: the CPU column tells.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
IQN = "iqn.2026-11.io.lunastor:bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Job:
    name: str
    op: str  # read | write
    pattern: str  # rand | seq
    block: int
    depth: int

    @property
    def label(self) -> str:
        size = f"{self.block // 1024}K" if self.block < 1 << 20 else f"{self.block >> 20}M"
        return f"{size} {self.pattern} {self.op} QD{self.depth}"


JOBS = [
    Job("rr4k", "read", "rand", 4096, 32),
    Job("rw4k", "write", "rand", 4096, 32),
    Job("sr1m", "read", "seq", 1 << 20, 8),
    Job("sw1m", "write", "seq", 1 << 20, 8),
    Job("qd1r", "read", "rand", 4096, 1),
    Job("qd1w", "write", "rand", 4096, 1),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def build_client(out: Path) -> Path:
    binary = out / "iscsi-load"
    source = HERE / "iscsi_load.c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(source), "-liscsi"], check=True)
    return binary


@contextmanager
def tgt_target(image: Path, port: int) -> Iterator[tuple[int, str]]:
    """tgtd on `image`, with the same PDU sizes lunastor negotiates, as LUN 1."""
    ctl = str(port % 1000 + 1000)  # a private control port: no clash with another tgtd
    proc = subprocess.Popen(
        ["tgtd", "-f", "-C", ctl, "--iscsi", f"portal=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    adm = ["tgtadm", "-C", ctl, "--lld", "iscsi"]
    try:
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                [*adm, "--op", "show", "--mode", "target"], capture_output=True
            ).returncode
            != 0
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("tgtd did not start")
            time.sleep(0.05)
        for args in (
            ["--op", "new", "--mode", "target", "--tid", "1", "-T", IQN],
            [
                "--op",
                "new",
                "--mode",
                "logicalunit",
                "--tid",
                "1",
                "--lun",
                "1",
                "--bstype",
                "rdwr",
                "-b",
                str(image),
            ],
            ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"],
        ):
            subprocess.run([*adm, *args], check=True, capture_output=True)
        for key, value in (
            ("MaxRecvDataSegmentLength", "262144"),
            ("MaxXmitDataSegmentLength", "262144"),
            ("FirstBurstLength", "262144"),
            ("MaxBurstLength", "1048576"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
        ):
            subprocess.run(
                [*adm, "--op", "update", "--mode", "target", "--tid", "1", "-n", key, "-v", value],
                check=True,
                capture_output=True,
            )
        wait_port(port)
        yield proc.pid, f"iscsi://127.0.0.1:{port}/{IQN}/1"
    finally:
        subprocess.run(
            [*adm, "--op", "delete", "--mode", "target", "--tid", "1", "--force"],
            capture_output=True,
        )
        subprocess.run(
            ["tgtadm", "-C", ctl, "--op", "delete", "--mode", "system"], capture_output=True
        )  # tgtd ignores SIGTERM alone
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def lunastor_target(image: Path, port: int) -> Iterator[tuple[int, str]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lunastor.chunk.main",
            "standalone",
            "--file",
            str(image),
            "--iqn",
            IQN,
            "--listen",
            f"127.0.0.1:{port}",
            "--lun",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield proc.pid, f"iscsi://127.0.0.1:{port}/{IQN}/1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_job(
    client: Path, url: str, job: Job, seconds: float, pids: Sequence[int], range_bytes: int
) -> dict[str, float]:
    """One job against `url`; CPU per IO is summed over `pids` (every process serving it)."""
    before = sum(cpu_seconds(p) for p in pids)
    out = subprocess.run(
        [
            str(client),
            url,
            job.op,
            job.pattern,
            str(job.block),
            str(job.depth),
            str(seconds),
            str(range_bytes),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    cpu = sum(cpu_seconds(p) for p in pids) - before
    if out.returncode != 0:
        raise RuntimeError(f"{job.label}: {out.stderr.strip() or out.stdout.strip()}")
    result: dict[str, float] = json.loads(out.stdout)
    result["cpu_us_per_io"] = cpu * 1e6 / max(1, result["ios"])
    result["cpu_percent"] = cpu * 100 / result["seconds"]
    return result


def print_result(name: str, job: Job, r: dict[str, float]) -> None:
    print(
        f"  {name:9} {job.label:22} {r['iops']:>10.0f} IOPS "
        f"{r['mbps']:>8.1f} MB/s  p50 {r['lat_p50_us']:>7.0f} us  "
        f"CPU {r['cpu_us_per_io']:>6.1f} us/IO",
        flush=True,
    )


def print_ratios(
    jobs: Sequence[Job],
    anchor: dict[str, dict[str, float]],
    ours: dict[str, dict[str, float]],
) -> None:
    """The comparison table: ours / anchor for throughput, anchor / ours for QD1 latency."""
    print()
    print(
        f"{'job':24} {'tgt':>12} {'lunastor':>12} {'ratio':>7}  "
        f"{'tgt CPU/IO':>10} {'ours CPU/IO':>11}"
    )
    for job in jobs:
        t, o = anchor[job.name], ours[job.name]
        if job.depth == 1:  # latency line: lower is better, ratio is tgt/ours
            tv, ov, unit = t["lat_p50_us"], o["lat_p50_us"], "us p50"
            ratio = tv / ov if ov else 0.0
        else:
            key = "iops" if job.block < 1 << 20 else "mbps"
            tv, ov, unit = t[key], o[key], "IOPS" if key == "iops" else "MB/s"
            ratio = ov / tv if tv else 0.0
        print(
            f"{job.label:24} {tv:>8.0f} {unit:<4}{'':0} {ov:>8.0f}     {ratio:>6.2f}x  "
            f"{t['cpu_us_per_io']:>8.1f}us {o['cpu_us_per_io']:>9.1f}us"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--size", type=int, default=1 << 30, help="LUN size in bytes")
    parser.add_argument("--jobs", default=",".join(j.name for j in JOBS))
    parser.add_argument("--targets", default="tgt,lunastor", help="which targets to run")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()
    if shutil.which("tgtd") is None:
        print("tgtd is not installed: run ./scripts/setup.sh", file=sys.stderr)
        return 2
    jobs = [j for j in JOBS if j.name in args.jobs.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    client = build_client(args.out)
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="lunastor-bench-") as tmp:
        image = Path(tmp) / "lun.img"
        with open(image, "wb") as f:
            f.truncate(args.size)
        # Fill the file once so both targets read real data from the page cache.
        subprocess.run(
            [
                "dd",
                "if=/dev/urandom",
                f"of={image}",
                "bs=1M",
                f"count={args.size >> 20}",
                "conv=notrunc",
                "status=none",
            ],
            check=True,
        )
        targets = {"tgt": tgt_target, "lunastor": lunastor_target}
        for name in args.targets.split(","):
            target = targets[name]
            with target(image, free_port()) as (pid, url):
                results[name] = {}
                for job in jobs:
                    r = run_job(client, url, job, args.seconds, [pid], args.size)
                    results[name][job.name] = r
                    print_result(name, job, r)
    if set(results) != set(targets):
        return 0  # a single target was asked for: no ratios
    print_ratios(jobs, results["tgt"], results["lunastor"])
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (args.out / f"iscsi_target-{stamp}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
