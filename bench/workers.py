"""Issue 17's multi-worker line: does a chunk server of two worker processes do more IO than one
of one process (lunastor/chunk/workers.py, docs/scale.md)?

How it is measured: a dev cluster of one chunk server, first with `workers = 1`, then a fresh
one with `workers = 2`. Each has two 1-replica volumes (filled from the bench's source image
first), each exported to its own initiator (two hosts), on different workers when there are
two (volumes are made until the second lands on the other worker; `volumes`), and two
`qemu-img bench` clients run at once, one per volume, each its own iSCSI session through the
chunk server's portal (worker 0 hands each login to the worker owning its volume): 4 KiB
random write, then 4 KiB random read, QD32 (the suite's `rw4k` and `rr4k` jobs). Both
clients get the same request count, calibrated so that the pair runs for about `seconds`; the
pair's IOPS is the requests of both over the longer of the two runs (conservative: a client
that finished early is not counted as still running).

Both clusters run at once and their pairs **alternate** (1 worker, 2 workers, `ROUNDS` times
per job; each setup's figure sums its rounds): other load on the machine, which swings IOPS
2-3x within minutes, then falls on both alike instead of on whichever ran second. The chunk
server's CPU (every worker process) and the clients' are measured around each pair, in cores
and per IO: when neither is near a core, the IOPS measure the CPU the machine's scheduler
gave these processes, not what the server can do. The line says where the sessions landed
(iSCSI logins per worker, from each worker's /metrics).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from bench.cpu import ChildRun, ProcessGroup, delta, run_child
from bench.qemu_img import (
    JOB_BY_NAME,
    PROBE_SECONDS,
    REPORT_END,
    Job,
    JobFailed,
    bench_argv,
    fill,
    next_probe_count,
    parse_bench_output,
    run_count,
)
from bench.systems import BENCH_INITIATOR
from bench.systems.devcluster import DevCluster, Volume, dev_cluster, metric_samples, when_served
from lunastor.chunk.workers import owner

ACCESS_POINT = "chunk1"
JOBS = (JOB_BY_NAME["rw4k"], JOB_BY_NAME["rr4k"])
COUNTS = (1, 2)  # workers per chunk server, compared
LOGINS = "lunastor_iscsi_logins_total"
CLIENT_IQN = f"{BENCH_INITIATOR}-host"  # + the volume's number: one initiator per client
MAX_TRIES = 16
ROUNDS = 2  # alternating pairs per setup and job


@dataclass(frozen=True)
class Pair:
    """One job run by two clients at once."""

    job: str
    ios: int  # both clients' requests
    seconds: float  # the longer client's IO phase
    client_iops: tuple[float, float]  # each client's own
    server_cores: float  # the chunk server's CPU over the pair, in cores
    server_us_per_io: float  # the same per request
    client_cores: float = 0.0  # both clients' CPU over the pair, in cores
    load: float = 0.0  # the machine's 1-minute load average after the pair

    @property
    def iops(self) -> float:
        return self.ios / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Setup:
    """One chunk server of `workers` workers: both jobs, and where the sessions landed."""

    workers: int
    pairs: dict[str, Pair]
    logins: list[float]  # normal-session logins per worker during the jobs

    def to_json(self) -> dict[str, object]:
        return {
            "workers": self.workers,
            "logins": self.logins,
            "pairs": {k: {**asdict(p), "iops": p.iops} for k, p in self.pairs.items()},
        }


def _both(job: Job, opts: Sequence[str], size: int, count: int, timeout: float) -> list[ChildRun]:
    """`count` requests of `job` from each client, all clients at once."""
    argvs = [bench_argv(job, o, size, count) for o in opts]
    with concurrent.futures.ThreadPoolExecutor(len(argvs)) as pool:
        runs = list(pool.map(lambda a: run_child(a, timeout=timeout, stop_after=REPORT_END), argvs))
    for run in runs:
        if run.timed_out or run.returncode != 0:
            raise JobFailed(f"{job.label}: qemu-img bench failed: {run.output.strip()[-300:]}")
    return runs


def calibrate(job: Job, opts: Sequence[str], size: int, seconds: float) -> int:
    """The request count per client for a pair of about `seconds`."""
    probe_target = min(PROBE_SECONDS * 3, seconds / 3)
    count = max(16, 4 * job.depth)
    while True:
        outs = [parse_bench_output(r.output) for r in _both(job, opts, size, count, timeout=60)]
        slowest = max(o.seconds for o in outs)
        if slowest >= probe_target:
            return run_count(count, slowest, seconds, job.depth)
        count = next_probe_count(count, slowest, probe_target)


def pair(
    job: Job, opts: Sequence[str], size: int, count: int, seconds: float, server: ProcessGroup
) -> Pair:
    """`count` requests of `job` from each client at once, with the server's CPU."""
    before, started = server.sample(), time.monotonic()
    runs = _both(job, opts, size, count, timeout=max(30.0, 4 * seconds + 20))
    cpu = delta(before, server.sample())
    wall = time.monotonic() - started
    outs = [parse_bench_output(r.output) for r in runs]
    ios = sum(o.requests for o in outs)
    return Pair(
        job=job.name,
        ios=ios,
        seconds=max(o.seconds for o in outs),
        client_iops=(outs[0].requests / outs[0].seconds, outs[1].requests / outs[1].seconds),
        server_cores=cpu.seconds / wall,
        server_us_per_io=cpu.seconds * 1e6 / max(1, ios),
        client_cores=sum(r.cpu_seconds for r in runs) / wall,
        load=os.getloadavg()[0],
    )


def combined(rounds: Sequence[Pair]) -> Pair:
    """Rounds of one setup as one pair: their requests over their summed time."""
    secs = sum(p.seconds for p in rounds)
    ios = sum(p.ios for p in rounds)
    n = len(rounds)
    return Pair(
        job=rounds[0].job,
        ios=ios,
        seconds=secs,
        client_iops=(
            sum(p.client_iops[0] * p.seconds for p in rounds) / secs,
            sum(p.client_iops[1] * p.seconds for p in rounds) / secs,
        ),
        server_cores=sum(p.server_cores for p in rounds) / n,
        server_us_per_io=sum(p.server_us_per_io * p.ios for p in rounds) / max(1, ios),
        client_cores=sum(p.client_cores for p in rounds) / n,
        load=max(p.load for p in rounds),
    )


def _logins(cluster: DevCluster, workers: int) -> list[float]:
    host, _, port = str(cluster.daemon(ACCESS_POINT)["endpoints"]["admin"]).rpartition(":")
    out = []
    for i in range(workers):
        text = cluster.metrics_at(f"{host}:{int(port) + i}")
        out.append(metric_samples(text, LOGINS).get('{type="normal"}', 0.0))
    return out


def volumes(cluster: DevCluster, size: int, workers: int) -> list[Volume]:
    """Two 1-replica volumes, one per client (host), each exported to its own initiator; with
    two workers, of different owners (volumes are made until one lands on the other worker:
    ownership is a hash of the volume's id, chunk/workers.py)."""
    made = [cluster.create_volume("bench-w0", size, 1, f"{CLIENT_IQN}0")]
    for i in range(1, 1 + MAX_TRIES):
        vol = cluster.create_volume(f"bench-w{i}", size, 1, f"{CLIENT_IQN}{i}")
        if workers < 2 or owner(vol.id, workers) != owner(made[0].id, workers):
            return [made[0], vol]
    raise RuntimeError(f"no volume of {MAX_TRIES} landed on another worker than {made[0].id}")


@dataclass
class _Rig:
    workers: int
    cluster: DevCluster
    opts: list[str]
    logins: list[float]  # before the jobs


def measure(work: Path, source: Path, size: int, seconds: float) -> list[Setup]:
    """Both setups up at once, their pairs alternating (see the module's docstring)."""
    with contextlib.ExitStack() as stack:
        rigs = []
        for n in COUNTS:
            cluster = stack.enter_context(
                dev_cluster(work / f"workers-{n}", chunks=1, chunk_workers=n)
            )
            portal = cluster.portal(ACCESS_POINT)
            opts = [v.image_opts(portal) for v in volumes(cluster, size, n)]
            for o in opts:
                when_served(partial(fill, str(source), o))
            rigs.append(_Rig(n, cluster, opts, []))
        for rig in rigs:
            rig.logins = _logins(rig.cluster, rig.workers)
        rounds: dict[int, dict[str, list[Pair]]] = {r.workers: {} for r in rigs}
        for job in JOBS:
            counts = [calibrate(job, rig.opts, size, seconds) for rig in rigs]
            for _ in range(ROUNDS):
                for rig, count in zip(rigs, counts, strict=True):
                    done = pair(job, rig.opts, size, count, seconds, rig.cluster.servers())
                    rounds[rig.workers].setdefault(job.name, []).append(done)
        return [
            Setup(
                rig.workers,
                {job: combined(p) for job, p in rounds[rig.workers].items()},
                [a - b for a, b in zip(_logins(rig.cluster, rig.workers), rig.logins, strict=True)],
            )
            for rig in rigs
        ]


def ratio(setups: Sequence[Setup], job: str) -> float | None:
    one = next((s for s in setups if s.workers == 1), None)
    two = next((s for s in setups if s.workers == 2), None)
    if one is None or two is None or not one.pairs[job].iops:
        return None
    return two.pairs[job].iops / one.pairs[job].iops


def measures(setups: Sequence[Setup]) -> dict[str, float]:
    out = {}
    for job in JOBS:
        r = ratio(setups, job.name)
        if r is not None:
            out[f"workers.{job.name}.x_one"] = r
    return out


def lines(setups: Sequence[Setup], size: int) -> list[str]:
    out = [
        f"workers (issue 17): one chunk server, two 1-replica volumes of {size >> 20} MiB, two "
        f"qemu-img bench clients at once (a session each, {ACCESS_POINT}'s portal), "
        "4 KiB random, QD32 (bench/workers.py)"
    ]
    for s in setups:
        cells = []
        for job in JOBS:
            p = s.pairs[job.name]
            r = ratio(setups, job.name) if s.workers > 1 else None
            vs = f" ({r:.2f}x 1 worker)" if r is not None else ""
            cells.append(
                f"{job.op} {p.iops:>8,.0f} IOPS{vs}, server {p.server_cores:.2f} cores, "
                f"{p.server_us_per_io:.0f} us/IO, clients {p.client_cores:.2f} cores"
            )
        logins = "/".join(f"{n:.0f}" for n in s.logins)
        out.append(f"  {s.workers} worker{'s' if s.workers > 1 else ' '}: " + "; ".join(cells))
        load = max(p.load for p in s.pairs.values())
        out.append(
            f"             sessions' logins per worker: {logins}; {ROUNDS} rounds each, "
            f"alternating with the other setup; load average up to {load:.1f}"
        )
    return out
