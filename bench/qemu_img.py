"""The one client every system is measured with: `qemu-img bench`, and `qemu-img convert` to
fill a volume before it is read.

qemu-img reaches each system through its own block driver (`driver=iscsi`: libiscsi;
`driver=gluster`: gfapi), opened with `--image-opts` straight at the protocol driver (no raw
format layer), default cache mode. `qemu-img bench` sends a fixed number of requests and
reports only the elapsed time; so each job is first calibrated (short runs that double until
one lasts long enough to estimate the rate), then run once for about `seconds`.

qemu-img bench has no random pattern: it advances the offset by a fixed step, modulo the image
size. A "random" job uses a step of an odd number of blocks that shares no factor with the
image's block count, so every block is visited once per cycle in a scattered order (no two
consecutive requests are near each other; no read-ahead or merging helps).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bench.cpu import ChildRun, CpuDelta, ProcessGroup, delta, run_child

# Written data: qemu-img bench writes zeros unless told otherwise, which a target could treat
# specially (zero detection, unmapping) and which would leave the images all zeros.
WRITE_PATTERN = 0xA5
KIB = 1 << 10
MIB = 1 << 20
GOLDEN_RATIO = (math.sqrt(5) - 1) / 2  # the stride that spreads a modular walk the most


@dataclass(frozen=True)
class Job:
    name: str  # short key: --jobs, JSON, goals
    write: bool
    random: bool
    block: int
    depth: int
    flush_interval: int = 0  # qemu-img bench --flush-interval: a flush after every N requests

    @property
    def group(self) -> str:
        """Jobs are reported in tables by group: same block size, pattern and depth."""
        size = f"{self.block // KIB} KiB" if self.block < MIB else f"{self.block // MIB} MiB"
        pattern = "random" if self.random else "sequential"
        return f"{size} {pattern}, QD{self.depth}"

    @property
    def op(self) -> str:
        if self.flush_interval:
            return (
                f"write+flush/{self.flush_interval}" if self.flush_interval > 1 else "write+flush"
            )
        return "write" if self.write else "read"

    @property
    def label(self) -> str:
        return f"{self.group} {self.op}"

    @property
    def by_bandwidth(self) -> bool:
        """1 MiB jobs are compared in MB/s, the others in IOPS."""
        return self.block >= MIB


JOBS: tuple[Job, ...] = (
    Job("rr4k", write=False, random=True, block=4 * KIB, depth=32),
    Job("rw4k", write=True, random=True, block=4 * KIB, depth=32),
    Job("sr1m", write=False, random=False, block=MIB, depth=8),
    Job("sw1m", write=True, random=False, block=MIB, depth=8),
    Job("qd1r", write=False, random=True, block=4 * KIB, depth=1),
    Job("qd1w", write=True, random=True, block=4 * KIB, depth=1),
    Job("qd1wf", write=True, random=True, block=4 * KIB, depth=1, flush_interval=1),
)
JOB_BY_NAME: Mapping[str, Job] = {j.name: j for j in JOBS}


# Every image is opened with cache.direct=on: no cache in the client, so a request completes
# when the system acknowledged it (the iSCSI driver has no cache anyway; gfapi's write-behind
# would otherwise acknowledge writes before any brick has them).
CACHE = "cache.direct=on"


def iscsi_opts(portal: str, target: str, lun: int, initiator: str) -> str:
    return (
        f"driver=iscsi,{CACHE},transport=tcp,portal={portal},target={target},lun={lun},"
        f"initiator-name={initiator}"
    )


def gluster_opts(host: str, volume: str, path: str) -> str:
    return (
        f"driver=gluster,{CACHE},volume={volume},path={path},"
        f"server.0.type=inet,server.0.host={host},server.0.port=24007"
    )


def step_bytes(job: Job, image_bytes: int) -> int:
    """The offset step: one block for a sequential job; for a random one the golden-ratio
    stride in blocks, moved up to the next count coprime with the image's block count (a full
    scattered cycle)."""
    blocks = image_bytes // job.block
    if not job.random or blocks < 3:
        return job.block
    stride = round(blocks * GOLDEN_RATIO)
    while math.gcd(stride, blocks) != 1:
        stride += 1
    return stride * job.block


def bench_argv(job: Job, opts: str, image_bytes: int, count: int) -> list[str]:
    argv = [
        "stdbuf", "-oL",  # line-buffered: the report is read before qemu-img exits
        "qemu-img", "bench", "--image-opts",
        "-c", str(count), "-d", str(job.depth), "-s", str(job.block),
        "-S", str(step_bytes(job, image_bytes)),
    ]  # fmt: skip
    if job.write:
        argv += ["-w", f"--pattern={WRITE_PATTERN}"]
    if job.flush_interval:
        argv.append(f"--flush-interval={job.flush_interval}")
    return [*argv, opts]


@dataclass(frozen=True)
class BenchOutput:
    """What `qemu-img bench` printed."""

    requests: int
    write: bool
    block: int
    depth: int
    offset: int
    step: int
    flush_interval: int  # 0: no flushes
    seconds: float


_SENDING = re.compile(
    r"Sending (\d+) (read|write) requests, (\d+) bytes each, (\d+) in parallel "
    r"\(starting at offset (\d+), step size (\d+)\)"
)
_FLUSH = re.compile(r"Sending flush every (\d+) requests")
_DONE = re.compile(r"Run completed in (\d+(?:\.\d+)?) seconds")
# The report is complete at the end of its last line: the client is stopped there rather than
# waiting for its exit (gfapi's shutdown takes 10 s; the close's final flush is not timed by
# qemu-img bench for any system either).
REPORT_END = " seconds."


def parse_bench_output(text: str) -> BenchOutput:
    """Parse qemu-img bench's report; ValueError naming what is missing otherwise (an error
    message from qemu-img is then in `text`)."""
    sending, done = _SENDING.search(text), _DONE.search(text)
    if sending is None or done is None:
        raise ValueError(f"not a qemu-img bench report: {text.strip()[-300:]!r}")
    flush = _FLUSH.search(text)
    return BenchOutput(
        requests=int(sending.group(1)),
        write=sending.group(2) == "write",
        block=int(sending.group(3)),
        depth=int(sending.group(4)),
        offset=int(sending.group(5)),
        step=int(sending.group(6)),
        flush_interval=int(flush.group(1)) if flush else 0,
        seconds=float(done.group(1)),
    )


# Calibration: a probe shorter than this does not estimate the rate well (start-up, ramp-up)
PROBE_SECONDS = 0.3


def next_probe_count(count: int, seconds: float, target: float = PROBE_SECONDS) -> int:
    """The next calibration count after `count` requests took `seconds`: aim at 1.5x the
    target, growing at least 2x and at most 16x per step."""
    factor = 16.0 if seconds <= 0 else min(16.0, max(2.0, 1.5 * target / seconds))
    return math.ceil(count * factor)


def run_count(count: int, seconds: float, wanted: float, depth: int) -> int:
    """Requests to send for a run of about `wanted` seconds, from a probe of `count` requests
    that took `seconds`; at least two full queues."""
    rate = count / max(seconds, 1e-6)
    return max(2 * depth, math.ceil(rate * wanted))


class JobFailed(RuntimeError):
    """A job could not be measured (qemu-img failed or overran its time bound)."""


@dataclass(frozen=True)
class JobResult:
    job: str
    ios: int
    block: int
    seconds: float  # the IO phase, as qemu-img bench reports it
    server_cpu: CpuDelta
    other_cpu: CpuDelta | None  # the system's processes outside `server_cpu` (lunastor: control)
    client_cpu_seconds: float
    client_wall_seconds: float

    @property
    def iops(self) -> float:
        return self.ios / self.seconds if self.seconds > 0 else 0.0

    @property
    def mbps(self) -> float:
        return self.iops * self.block / 1e6

    @property
    def latency_us(self) -> float:
        """Mean time per request for one request in flight (QD1 jobs): 1 / IOPS."""
        return 1e6 / self.iops if self.iops else float("nan")

    @property
    def server_cpu_us_per_io(self) -> float:
        return self.server_cpu.per_io_us(self.ios)

    @property
    def client_cpu_percent(self) -> float:
        return self.client_cpu_seconds * 100 / self.client_wall_seconds

    def to_json(self) -> dict[str, object]:
        return {
            "ios": self.ios,
            "seconds": self.seconds,
            "iops": self.iops,
            "mbps": self.mbps,
            "server_cpu_s": self.server_cpu.seconds,
            "server_cpu_us_per_io": self.server_cpu_us_per_io,
            "server_processes": self.server_cpu.processes,
            "other_cpu_s": None if self.other_cpu is None else self.other_cpu.seconds,
            "client_cpu_s": self.client_cpu_seconds,
        }


def _bench(
    job: Job, opts: str, image_bytes: int, count: int, timeout: float
) -> tuple[ChildRun, BenchOutput]:
    argv = bench_argv(job, opts, image_bytes, count)
    run = run_child(argv, timeout=timeout, stop_after=REPORT_END)
    if run.timed_out:
        raise JobFailed(f"{job.label}: {count} requests did not finish in {timeout:.0f} s")
    if run.returncode != 0:
        raise JobFailed(f"{job.label}: qemu-img bench failed: {run.output.strip()[-300:]}")
    try:
        return run, parse_bench_output(run.output)
    except ValueError as exc:
        raise JobFailed(f"{job.label}: {exc}") from exc


def run_job(
    job: Job,
    opts: str,
    image_bytes: int,
    seconds: float,
    servers: ProcessGroup,
    others: ProcessGroup | None = None,
) -> JobResult:
    """Calibrate `job` against `opts`, then run it for about `seconds`, with the CPU of every
    process of `servers` (and `others`) over that run."""
    probe_target = min(PROBE_SECONDS, seconds / 3)
    count = max(16, 4 * job.depth)
    while True:
        _, out = _bench(job, opts, image_bytes, count, timeout=60)
        if out.seconds >= probe_target:
            break
        count = next_probe_count(count, out.seconds, probe_target)
    count = run_count(count, out.seconds, seconds, job.depth)
    server0 = servers.sample()
    other0 = others.sample() if others else {}
    run, out = _bench(job, opts, image_bytes, count, timeout=max(30.0, 4 * seconds + 20))
    server_cpu = delta(server0, servers.sample())
    other_cpu = delta(other0, others.sample()) if others else None
    return JobResult(
        job=job.name,
        ios=out.requests,
        block=out.block,
        seconds=out.seconds,
        server_cpu=server_cpu,
        other_cpu=other_cpu,
        client_cpu_seconds=run.cpu_seconds,
        client_wall_seconds=run.wall_seconds,
    )


def fill(source: str, opts: str, timeout: float = 1800) -> float:
    """Copy the raw file `source` onto the image `opts` (qemu-img convert, 16 requests in
    flight, out of order); returns seconds."""
    argv = ["qemu-img", "convert", "-n", "-W", "-m", "16", "-f", "raw", source,
            "--target-image-opts", opts]  # fmt: skip
    run = run_child(argv, timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(f"qemu-img convert onto {opts}: {run.output.strip()[-300:]}")
    return run.wall_seconds


def jobs_named(names: Sequence[str]) -> list[Job]:
    unknown = [n for n in names if n not in JOB_BY_NAME]
    if unknown:
        raise ValueError(f"unknown job(s) {', '.join(unknown)}; known: {', '.join(JOB_BY_NAME)}")
    return [JOB_BY_NAME[n] for n in names]
