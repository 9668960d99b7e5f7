"""Facts about the machine a benchmark ran on, measured by the bench itself: cores, load
before the start, and the disk under the work directory (4 KiB write + fdatasync per second,
the floor of a synchronous commit; O_DIRECT 1 MiB write bandwidth, the reference for
re-replication rates)."""

from __future__ import annotations

import mmap
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MIB = 1 << 20


@dataclass(frozen=True)
class Machine:
    cores: int  # usable by this process
    cpu_model: str
    kernel: str
    memory_gib: float
    load_before: tuple[float, float, float]
    filesystem: str  # type and device under the work directory
    fdatasync_per_s: float  # 4 KiB pwrite + fdatasync, one at a time
    direct_write_mbps: float  # O_DIRECT sequential 1 MiB writes, fdatasync at the end
    versions: dict[str, str]

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    def lines(self) -> list[str]:
        load = " ".join(f"{x:.2f}" for x in self.load_before)
        return [
            f"machine: {self.cores} cores ({self.cpu_model}), {self.memory_gib:.0f} GiB, "
            f"Linux {self.kernel}; load average before start {load}",
            f"disk ({self.filesystem}): 4 KiB write+fdatasync {self.fdatasync_per_s:,.0f}/s, "
            f"O_DIRECT 1 MiB writes {self.direct_write_mbps:,.0f} MB/s",
            "versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()),
        ]


def fdatasync_rate(directory: Path, seconds: float) -> float:
    """4 KiB writes, each followed by fdatasync, over one preallocated file, for `seconds`."""
    path = directory / "fdatasync-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, MIB)
        os.fsync(fd)
        block = os.urandom(4096)
        count, start = 0, time.monotonic()
        deadline = start + seconds
        while time.monotonic() < deadline:
            os.pwrite(fd, block, (count % 256) * 4096)
            os.fdatasync(fd)
            count += 1
        return count / (time.monotonic() - start)
    finally:
        os.close(fd)
        path.unlink()


def direct_write_mbps(directory: Path, seconds: float, limit: int = 512 * MIB) -> float:
    """Sequential 1 MiB O_DIRECT writes for about `seconds` (at most `limit` bytes), then one
    fdatasync: the disk's own write bandwidth without the page cache."""
    path = directory / "direct-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    buf = mmap.mmap(-1, MIB)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(MIB))
    try:
        written, start = 0, time.monotonic()
        while written < limit and time.monotonic() - start < seconds:
            written += os.pwrite(fd, buf, written)
        os.fdatasync(fd)
        return written / (time.monotonic() - start) / 1e6
    finally:
        buf.close()
        os.close(fd)
        path.unlink()


def _first_line(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def versions() -> dict[str, str]:
    return {
        "qemu-img": _first_line(["qemu-img", "--version"]).removeprefix("qemu-img version "),
        "tgt": _first_line(["tgtd", "--version"]),
        "glusterfs": _first_line(["glusterd", "--version"]).removeprefix("glusterfs "),
        "python": platform.python_version(),
    }


def filesystem(directory: Path) -> str:
    proc = subprocess.run(
        ["df", "--output=fstype,source", str(directory)], capture_output=True, text=True
    )
    rows = proc.stdout.strip().splitlines()
    return " on ".join(rows[-1].split()) if len(rows) > 1 else "unknown"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def measure(directory: Path, load_before: tuple[float, float, float], seconds: float) -> Machine:
    """The machine's facts; the disk probes take about `seconds` each."""
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return Machine(
        cores=len(os.sched_getaffinity(0)),
        cpu_model=cpu_model(),
        kernel=platform.release(),
        memory_gib=pages / (1 << 30),
        load_before=load_before,
        filesystem=filesystem(directory),
        fdatasync_per_s=fdatasync_rate(directory, seconds),
        direct_write_mbps=direct_write_mbps(directory, seconds),
        versions=versions(),
    )
