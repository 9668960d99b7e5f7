"""Issue 17's multi-worker line: does a chunk server of two worker processes do more IO than one
of one process (lunastor/chunk/workers.py, docs/scale.md)?

How it is measured: a dev cluster of one chunk server, first with `workers = 1`, then a fresh
one with `workers = 2`. Each has two 1-replica volumes (filled from the bench's source image
first), each exported to its own initiator (two hosts), on different workers when there are
two (volumes are made until the second lands on the other worker; `volumes`), and two clients
run at once, one per volume, each its own iSCSI session through the chunk server's portal
(worker 0 hands each login to the worker owning its volume): 4 KiB random write, then 4 KiB
random read, QD32 (the suite's `rw4k` and `rr4k` jobs), each client for `seconds`. The pair's
IOPS is the requests of both over the longer of the two runs.

The clients are bench/iscsi_light.c (`iscsi_load.LIGHT`), the same in both setups: the server
and its clients share the machine's two cores, so each microsecond of client CPU per request is
one the 2-worker server does not get (the 1-worker server is bounded by its one core, its
clients use the other). With server CPU s and client CPU c per request, 2 workers reach at most
2s/(s+c) times 1 worker. `qemu-img bench` spent 5.5 us per 4 KiB read on an idle machine (0.33
cores at 60,495 IOPS) against the server's 26, capping the read line near 1.65x before any
other loss; libiscsi (bench/iscsi_load.c) makes three system calls per request; the light
client sends every ready command in one send and reads every arrived response in one recv
(measured under load 16-19: 2.5-3.6 us per read against qemu-img's 13-16 and libiscsi's
10-12). It reaches the target exactly as an initiator does: login, READ(16)/WRITE(16) with
immediate data, one session per client.

Both clusters run at once and their pairs **alternate** (1 worker, 2 workers, `ROUNDS` times
per job; each setup's figure sums its rounds): other load on the machine, which swings IOPS
2-3x within minutes, then falls on both alike instead of on whichever ran second. The chunk
server's CPU (every worker process) and the clients' are measured around each pair, in cores
and per IO: when neither is near a core, the IOPS measure the CPU the machine's scheduler
gave these processes, not what the server can do. The line says where the sessions landed
(iSCSI logins per worker, from each worker's /metrics) and how many reads each worker served
from its own replicas (`lunastor_local_reads_total`): a read of a sibling worker's extent
would take the local hop and not count there, so the reads not counted bound the hops.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import iscsi_load
from bench.cpu import ProcessGroup, delta, run_child
from bench.qemu_img import JOB_BY_NAME, Job, JobFailed, fill
from bench.systems import BENCH_INITIATOR
from bench.systems.devcluster import DevCluster, Volume, dev_cluster, metric_samples
from lunastor.chunk.workers import owner

ACCESS_POINT = "chunk1"
JOBS = (JOB_BY_NAME["rw4k"], JOB_BY_NAME["rr4k"])
COUNTS = (1, 2)  # workers per chunk server, compared
LOGINS = "lunastor_iscsi_logins_total"
LOCAL_READS = "lunastor_local_reads_total"
CLIENT_IQN = f"{BENCH_INITIATOR}-host"  # + the volume's number: one initiator per client
MAX_TRIES = 16
ROUNDS = 3  # alternating pairs per setup and job


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
    client_us_per_io: float = 0.0  # both clients' CPU per request

    @property
    def iops(self) -> float:
        return self.ios / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Setup:
    """One chunk server of `workers` workers: both jobs, and where the sessions landed."""

    workers: int
    pairs: dict[str, Pair]
    logins: list[float]  # normal-session logins per worker during the jobs
    local_reads: list[float] = field(default_factory=list)  # per worker, during the jobs

    @property
    def hops_at_most(self) -> int:
        """Reads not served by their session's worker from its own replicas: the hops are at
        most these (the rest are a replica's first read, which opens it: the general path)."""
        reads = self.pairs["rr4k"].ios if "rr4k" in self.pairs else 0
        return max(0, reads - round(sum(self.local_reads)))

    def to_json(self) -> dict[str, object]:
        return {
            "workers": self.workers,
            "logins": self.logins,
            "local_reads": self.local_reads,
            "pairs": {k: {**asdict(p), "iops": p.iops} for k, p in self.pairs.items()},
        }


def pair(
    job: Job, rig: _Rig, size: int, seconds: float, binary: Path, server: ProcessGroup
) -> Pair:
    """Both clients run `job` for `seconds` at once, with the server's CPU and theirs."""
    load = iscsi_load.Load(write=job.write, random=job.random, block=job.block, depth=job.depth)
    argvs = [
        load.argv(binary, vol.url(rig.portal), seconds, size, vol.initiator) for vol in rig.volumes
    ]
    before, started = server.sample(), time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(argvs)) as pool:
        runs = list(pool.map(lambda a: run_child(a, timeout=2 * seconds + 60), argvs))
    cpu = delta(before, server.sample())
    wall = time.monotonic() - started
    outs = []
    for run in runs:
        if run.timed_out or run.returncode != 0:
            raise JobFailed(f"{job.label}: {binary.name} failed: {run.output.strip()[-300:]}")
        outs.append(iscsi_load.parse_load_output(run.output))
    ios = sum(o.ios for o in outs)
    client_cpu = sum(r.cpu_seconds for r in runs)
    return Pair(
        job=job.name,
        ios=ios,
        seconds=max(o.seconds for o in outs),
        client_iops=(outs[0].iops, outs[1].iops),
        server_cores=cpu.seconds / wall,
        server_us_per_io=cpu.seconds * 1e6 / max(1, ios),
        client_cores=client_cpu / wall,
        load=os.getloadavg()[0],
        client_us_per_io=client_cpu * 1e6 / max(1, ios),
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
        client_us_per_io=sum(p.client_us_per_io * p.ios for p in rounds) / max(1, ios),
    )


def per_worker(cluster: DevCluster, workers: int, metric: str, labels: str = "") -> list[float]:
    """Metric `metric` (its `labels` sample, or the sum of all) on each worker's /metrics."""
    host, _, port = str(cluster.daemon(ACCESS_POINT)["endpoints"]["admin"]).rpartition(":")
    out = []
    for i in range(workers):
        samples = metric_samples(cluster.metrics_at(f"{host}:{int(port) + i}"), metric)
        out.append(samples.get(labels, 0.0) if labels else sum(samples.values()))
    return out


def _counts(cluster: DevCluster, workers: int) -> tuple[list[float], list[float]]:
    """(normal-session logins, local reads) per worker."""
    return (
        per_worker(cluster, workers, LOGINS, '{type="normal"}'),
        per_worker(cluster, workers, LOCAL_READS),
    )


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
    portal: str
    volumes: list[Volume]
    before: tuple[list[float], list[float]] = ([], [])  # `_counts` before the jobs


def measure(work: Path, source: Path, size: int, seconds: float) -> list[Setup]:
    """Both setups up at once, their pairs alternating (see the module's docstring)."""
    binary = iscsi_load.build(work / "bin", iscsi_load.LIGHT)
    with contextlib.ExitStack() as stack:
        rigs = []
        for n in COUNTS:
            cluster = stack.enter_context(
                dev_cluster(work / f"workers-{n}", chunks=1, chunk_workers=n)
            )
            portal = cluster.portal(ACCESS_POINT)
            vols = volumes(cluster, size, n)
            for vol in vols:
                fill(str(source), vol.image_opts(portal))
            rigs.append(_Rig(n, cluster, portal, vols))
        for rig in rigs:
            rig.before = _counts(rig.cluster, rig.workers)
        rounds: dict[int, dict[str, list[Pair]]] = {r.workers: {} for r in rigs}
        for job in JOBS:
            for _ in range(ROUNDS):
                for rig in rigs:
                    done = pair(job, rig, size, seconds, binary, rig.cluster.servers())
                    rounds[rig.workers].setdefault(job.name, []).append(done)
        setups = []
        for rig in rigs:
            logins, local = _counts(rig.cluster, rig.workers)
            setups.append(
                Setup(
                    rig.workers,
                    {job: combined(p) for job, p in rounds[rig.workers].items()},
                    [a - b for a, b in zip(logins, rig.before[0], strict=True)],
                    [a - b for a, b in zip(local, rig.before[1], strict=True)],
                )
            )
        return setups


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
        f"clients at once (bench/iscsi_light.c, a session each, {ACCESS_POINT}'s portal), "
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
                f"{p.server_us_per_io:.0f} us/IO, clients {p.client_cores:.2f} cores, "
                f"{p.client_us_per_io:.1f} us/IO"
            )
        logins = "/".join(f"{n:.0f}" for n in s.logins)
        local = "/".join(f"{n:.0f}" for n in s.local_reads)
        out.append(f"  {s.workers} worker{'s' if s.workers > 1 else ' '}: " + "; ".join(cells))
        load = max(p.load for p in s.pairs.values())
        out.append(
            f"             sessions' logins per worker: {logins}; reads served from the "
            f"worker's own replicas: {local} (local hops at most {s.hops_at_most}); "
            f"{ROUNDS} rounds each, alternating with the other setup; load average up to "
            f"{load:.1f}"
        )
    return out
