"""`python -m bench` (`make bench`): lunastor against its anchors in one run, one client.

    python -m bench [--only PART,...] [--seconds 8] [--size 512MiB] [--jobs rr4k,...]

Every system is measured with the same client and jobs (`qemu-img bench` through its iscsi
and gluster drivers; bench/qemu_img.py): tgt on one file, GlusterFS replica 3, the lunastor
standalone target on the same file as tgt, and a lunastor dev cluster's 1-replica and
3-replica volumes through one chunk server's portal. Then the lines that need the cluster
(noisy neighbour, snapshots, catch-up and re-replication) and the other benchmarks
(control plane, extent store, metadata scale). Prints one table per job group, the extra
lines and the issues' goals, and writes everything as JSON to bench/out/.

Everything started is stopped on the way out, on failure and on SIGINT/SIGTERM too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench import goals, iscsi_load, locality, machine, noisy, rebuild, report, workers
from bench.cpu import ProcessGroup, delta
from bench.qemu_img import JOBS, Job, JobFailed, JobResult, fill, iscsi_opts, jobs_named, run_job
from bench.report import Outcome, SystemInfo
from bench.systems import BENCH_INITIATOR, System, become_subreaper
from bench.systems import gluster as gluster_system
from bench.systems import standalone as standalone_system
from bench.systems import tgt as tgt_system
from bench.systems.devcluster import DevCluster, Volume, dev_cluster
from tests.support.procs import free_port

ROOT = Path(__file__).resolve().parent.parent
PARTS = {
    "tgt": "tgtd on one file: the single-copy C anchor",
    "gluster": "GlusterFS replica 3 on three bricks, through gfapi: the replicated anchor",
    "standalone": "lunastor-chunk standalone on the same file as tgt",
    "r1": "a dev cluster's 1-replica volume through chunk1's portal",
    "r3": "a dev cluster's 3-replica volume through chunk1's portal",
    "r3-vip": "the 3-replica volume through the redirector's VIP (not in the default run)",
    "noisy": "noisy neighbour: QD1 p99 of one volume alone and next to a flood",
    "snapshots": "snapshot/clone create and the copy-on-write write (bench/snapshots.py)",
    "rebuild": "catch-up and re-replication of a lost replica, with a foreground load",
    "workers": "one chunk server of 1 and one of 2 worker processes, alternating (issue 17)",
    "control_plane": "the meta REST API against raw etcd (bench/control_plane.py)",
    "extent_store": "the local extent store and the data protocol (bench/extent_store.py)",
    "scale": "metadata of a 1,000-server, 1 PiB cluster, from a slice (bench/scale.py)",
}
DEFAULT_PARTS = tuple(p for p in PARTS if p != "r3-vip")
CLUSTER_PARTS = ("r1", "r3", "r3-vip", "noisy", "snapshots", "rebuild")
SUBPROCESS_PARTS = {  # benchmarks that stay their own command, run as they are
    "control_plane": ["-m", "bench.control_plane"],
    "extent_store": ["-m", "bench.extent_store"],
    "scale": ["-m", "bench.scale"],
}
SUBPROCESS_TIMEOUT = 900
ACCESS_POINT = "chunk1"
CATCH_UP_OUTAGE = 10.0
IDLE_SECONDS = 2.0


@dataclass
class Run:
    """Everything one run measured; printed at the end and written as JSON."""

    jobs: list[Job]
    seconds: float
    size: int
    systems: list[SystemInfo] = field(default_factory=list)
    results: dict[str, dict[str, Outcome]] = field(default_factory=dict)
    idle_cpu: dict[str, float] = field(default_factory=dict)  # % of a core, servers idle
    pids: dict[str, list[int]] = field(default_factory=dict)  # every server process started
    extra: list[str] = field(default_factory=list)  # the lines beyond the tables
    measures: dict[str, float] = field(default_factory=dict)
    ran: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    part_seconds: dict[str, float] = field(default_factory=dict)
    json: dict[str, Any] = field(default_factory=dict)

    def fail(self, part: str, exc: BaseException) -> None:
        message = f"{part}: {type(exc).__name__}: {exc}"
        self.failures.append(message)
        print(f"  FAILED {message}", flush=True)
        traceback.print_exc(file=sys.stdout)


def say(text: str) -> None:
    print(text, flush=True)


def loopback_host() -> str:
    """A random 127.x.y.z address, so parallel runs and tests do not collide."""
    return f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(2, 254)}"


def idle_cpu(group: ProcessGroup, seconds: float = IDLE_SECONDS) -> float:
    before = group.sample()
    time.sleep(seconds)
    return delta(before, group.sample()).percent(seconds)


def measure_system(run: Run, system: System) -> None:
    """Run every job against `system`; results and progress lines into `run`."""
    others = system.others.label if system.others else None
    run.systems.append(SystemInfo(system.name, system.label, system.servers.label, others))
    run.pids[system.name] = list(system.servers.pids())
    run.idle_cpu[system.name] = idle = idle_cpu(system.servers)
    say(f"  {system.label}: servers idle at {idle:.1f}% of a core ({system.servers.label})")
    outcomes: dict[str, Outcome] = {}
    run.results[system.name] = outcomes
    for job in run.jobs:
        run.ran.add(f"{system.name}.{job.name}")
        try:
            r = run_job(job, system.image_opts, system.size, run.seconds, system.servers,
                        system.others)  # fmt: skip
        except JobFailed as exc:
            outcomes[job.name] = str(exc)
            run.failures.append(f"{system.name} {exc}")
            say(f"  {system.name:10} {job.label:34} FAILED {exc}")
            continue
        outcomes[job.name] = r
        value = f"{r.mbps:>9,.1f} MB/s" if job.by_bandwidth else f"{r.iops:>9,.0f} IOPS"
        say(
            f"  {system.name:10} {job.label:34} {value}  server CPU "
            f"{r.server_cpu_us_per_io:>7.1f} us/IO  client CPU {r.client_cpu_percent:>3.0f}%"
        )


def make_image(path: Path, size: int) -> None:
    """A file of `size` random bytes: the data every system holds before its jobs run (reads
    return real data, not holes or zeros). Never written to: tgt and standalone serve a copy
    (`lun_file`)."""
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))


def lun_file(work: Path, source: Path) -> Path:
    """The file tgt and then the standalone target serve: a copy of `source`."""
    lun = work / "lun.img"
    if not lun.exists():
        shutil.copyfile(source, lun)
    return lun


def filled(label: str, image: Path, opts: str, size: int) -> None:
    took = fill(str(image), opts)
    say(f"  filled {label} ({size >> 20} MiB) in {took:.1f} s ({size / took / 1e6:.0f} MB/s)")


# --- the parts -----------------------------------------------------------------------------


def part_tgt(run: Run, work: Path, source: Path) -> None:
    host = loopback_host()
    with tgt_system.serve(lun_file(work, source), host, free_port(host), work / "tgtd.log") as t:
        opts = iscsi_opts(t.portal, t.iqn, t.lun, BENCH_INITIATOR)
        servers = ProcessGroup("tgtd", lambda: [t.pid])
        measure_system(run, System("tgt", "tgt, 1 copy (C)", opts, run.size, servers))


def part_gluster(run: Run, work: Path, source: Path) -> None:
    with gluster_system.replica3(work / "gluster", run.size) as g:
        say(f"  {g.version}, volume settings: {dict(gluster_system.SETTINGS)}")
        run.json["gluster"] = {"version": g.version, "namespace": g.namespace.name,
                               "settings": dict(gluster_system.SETTINGS)}  # fmt: skip
        filled("the Gluster image", source, g.image_opts, run.size)
        label = "glusterd, 3 bricks, self-heal daemon (replication itself runs in the client)"
        servers = ProcessGroup(label, g.namespace.pids)
        label = "GlusterFS replica 3 (gfapi)"
        measure_system(run, System("gluster", label, g.image_opts, run.size, servers))


def part_standalone(run: Run, work: Path, source: Path) -> None:
    host = loopback_host()
    with standalone_system.serve(
        lun_file(work, source), host, free_port(host), work / "standalone.log"
    ) as s:
        servers = ProcessGroup("its one process", lambda: [s.pid])
        opts = iscsi_opts(s.portal, s.iqn, s.lun, BENCH_INITIATOR)
        label = "lunastor standalone (1 file)"
        measure_system(run, System("standalone", label, opts, run.size, servers))


def cluster_system(
    cluster: DevCluster, name: str, label: str, volume: Volume, portal: str
) -> System:
    opts = volume.image_opts(portal)
    return System(name, label, opts, volume.size, cluster.servers(), cluster.control())


def part_cluster(
    run: Run, work: Path, source: Path, parts: Sequence[str], disk_mbps: float
) -> None:
    """The parts that share one dev cluster, in an order where the disruptive come last."""
    with dev_cluster(work / "cluster", env=rebuild.REBUILD_ENV) as cluster:
        say(f"  dev cluster up in {cluster.dir}, {len(cluster.chunk_names())} chunk servers")
        run.pids["cluster"] = cluster.chunk_pids() + cluster.control_pids()
        portal = cluster.portal(ACCESS_POINT)
        r3: Volume | None = None

        def volume_r3() -> Volume:
            nonlocal r3
            if r3 is None:
                r3 = cluster.create_volume("bench-r3", run.size, 3)
                filled("the 3-replica volume", source, r3.image_opts(portal), run.size)
            return r3

        guarded = guard(run)
        if "r1" in parts:
            with guarded("r1"):
                r1 = cluster.create_volume("bench-r1", run.size, 1)
                filled("the 1-replica volume", source, r1.image_opts(portal), run.size)
                settled = locality.settle(cluster, r1, ACCESS_POINT, portal, source)
                run.extra.append(locality.settled_line(*settled, "1-replica volume"))
                label = f"lunastor 1 replica ({ACCESS_POINT})"
                measure_system(run, cluster_system(cluster, "r1", label, r1, portal))
        if "r3" in parts:
            with guarded("r3"):
                vol = volume_r3()
                settled = locality.settle(cluster, vol, ACCESS_POINT, portal, source)
                run.extra.append(locality.settled_line(*settled, "3-replica volume"))
                before = locality.sample(cluster)
                label = f"lunastor 3 replicas ({ACCESS_POINT})"
                measure_system(run, cluster_system(cluster, "r3", label, vol, portal))
                share = locality.share(before, locality.sample(cluster))
                run.ran.add("locality")
                run.extra.append(locality.line(share, "3-replica volume, write jobs after warm-up"))
                run.json["locality_share"] = share
                if share is not None:
                    run.measures["locality.share"] = share
        if "r3-vip" in parts:
            with guarded("r3-vip"):
                vol = volume_r3()
                label = "lunastor 3 replicas (VIP)"
                measure_system(
                    run, cluster_system(cluster, "r3-vip", label, vol, cluster.vip_portal)
                )
        client = iscsi_load.build(ROOT / "bench" / "out")
        if "noisy" in parts:
            with guarded("noisy"):
                say("  noisy neighbour ...")
                n = noisy.measure(cluster, client, run.seconds)
                run.ran.add("noisy")
                run.extra += noisy.lines(n)
                run.measures.update(noisy.measures(n))
                run.json["noisy"] = n.to_json()
        if "snapshots" in parts:
            with guarded("snapshots"):
                say("  snapshots (bench/snapshots.py) ...")
                subprocess_part(run, "snapshots", ["-m", "bench.snapshots", "--dir",
                                                   str(cluster.dir)])  # fmt: skip
        if "rebuild" in parts:
            with guarded("rebuild"):
                vol = volume_r3()
                say(f"  catch-up: {rebuild.VICTIM} away for {CATCH_UP_OUTAGE:.0f} s ...")
                cu = rebuild.catch_up(cluster, client, vol, CATCH_UP_OUTAGE)
                say(f"  re-replication of {rebuild.VICTIM}'s replicas ...")
                rr = rebuild.rereplicate(cluster, client, vol, run.seconds, disk_mbps)
                run.ran.add("rebuild")
                run.extra += rebuild.lines(cu, rr, vol.size)
                run.measures.update({"rebuild.x_disk": rr.x_disk, "rebuild.fg_ratio": rr.fg_ratio})
                run.json["rebuild"] = {"catch_up": cu.__dict__, "rereplication": rr.to_json()}


def part_workers(run: Run, work: Path, source: Path) -> None:
    setups = workers.measure(work, source, run.size, run.seconds)
    run.ran.update(f"workers.{job.name}" for job in workers.JOBS)
    run.extra += workers.lines(setups, run.size)
    run.measures.update(workers.measures(setups))
    run.json["workers"] = [s.to_json() for s in setups]


def subprocess_part(run: Run, name: str, args: list[str]) -> None:
    """A benchmark that stays its own command: its output goes straight through."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, timeout=SUBPROCESS_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"python {' '.join(args)} exited with {proc.returncode}")
    run.ran.add(name)


def guard(run: Run) -> Callable[[str], AbstractContextManager[None]]:
    """A context manager per part: a failure is recorded and the run goes on with the next."""

    @contextmanager
    def guarded(part: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        except Exception as exc:
            run.fail(part, exc)
        took = time.monotonic() - start
        run.part_seconds[part] = took
        say(f"  ({part}: {took:.0f} s)")

    return guarded


# --- the run -------------------------------------------------------------------------------


def ensure_tools(parts: Sequence[str]) -> None:
    """Install what the asked-for parts need (scripts/bench-setup.sh) when a tool is missing."""
    need = ["qemu-img", "stdbuf", "gcc"]
    if "tgt" in parts:
        need += ["tgtd", "tgtadm"]
    if "gluster" in parts:
        need += ["glusterd", "gluster"]
    missing = [t for t in need if shutil.which(t) is None]
    if missing:
        say(f"missing {', '.join(missing)}: running scripts/bench-setup.sh")
        subprocess.run([str(ROOT / "scripts" / "bench-setup.sh")], check=True)


def summary(run: Run, facts: machine.Machine) -> list[str]:
    lines = [
        "== results",
        *facts.lines(),
        f"client: qemu-img bench, {run.seconds:g} s per job after calibration, "
        f"{run.size >> 20} MiB images, cache.direct=on; 'random' = a golden-ratio stride over "
        "the image (bench/qemu_img.py)",
        "",
        *report.tables(run.jobs, run.systems, run.results),
    ]
    idle = ", ".join(f"{name} {pct:.1f}%" for name, pct in run.idle_cpu.items())
    if idle:
        lines.append(f"servers' CPU while idle (included in CPU/IO), % of a core: {idle}")
    if run.extra:
        lines += ["", *run.extra]
    run.measures.update(goals.job_measures(run.jobs, run.results))
    goal_lines = goals.lines(run.measures, run.ran)
    if goal_lines:
        heading = "the issues' goals (this run; closed issues' as regression checks):"
        lines += ["", heading, *goal_lines]
    if run.failures:
        lines += ["", "FAILED:", *(f"  {f}" for f in run.failures)]
    return lines


def parse_size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    number, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB)")
    return int(number) * units[unit]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parts_help = "; ".join(f"{k}: {v}" for k, v in PARTS.items())
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_PARTS),
        help=f"comma-separated parts (default: all but r3-vip). {parts_help}",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="per job (default 8)")
    parser.add_argument("--size", type=parse_size, default=512 << 20, help="image/volume size")
    parser.add_argument("--jobs", default=",".join(j.name for j in JOBS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temp dir")
    args = parser.parse_args(list(argv))
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    try:
        args.job_list = jobs_named([j.strip() for j in args.jobs.split(",") if j.strip()])
    except ValueError as exc:
        parser.error(str(exc))
    if args.size % (1 << 20):
        parser.error("--size: a whole number of MiB")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    load_before = os.getloadavg()
    signal.signal(signal.SIGTERM, _interrupt)  # cleanups run as for Ctrl-C
    become_subreaper()
    ensure_tools(args.parts)
    run = Run(jobs=args.job_list, seconds=args.seconds, size=args.size)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        facts = measure_parts(run, args, load_before)
    except KeyboardInterrupt:
        say("interrupted: everything the bench started has been stopped")
        return 130
    lines = summary(run, facts)
    say("\n".join(["", *lines]))
    write_json(run, facts, args, lines)
    return 1 if run.failures else 0


def measure_parts(
    run: Run, args: argparse.Namespace, load_before: tuple[float, float, float]
) -> machine.Machine:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lunastor-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        facts = machine.measure(work, load_before, seconds=min(2.0, args.seconds / 2))
        for line in facts.lines():
            say(line)
        source = work / "source.img"
        make_image(source, args.size)
        guarded = guard(run)
        for part, body in (
            ("tgt", part_tgt),
            ("gluster", part_gluster),
            ("standalone", part_standalone),
        ):
            if part in args.parts:
                say(f"== {part}: {PARTS[part]}")
                with guarded(part):
                    body(run, work, source)
        cluster_parts = [p for p in CLUSTER_PARTS if p in args.parts]
        if cluster_parts:
            say(f"== dev cluster: {', '.join(cluster_parts)}")
            with guarded("dev cluster"):
                part_cluster(run, work, source, cluster_parts, facts.direct_write_mbps)
        if "workers" in args.parts:
            say(f"== workers: {PARTS['workers']}")
            with guarded("workers"):
                part_workers(run, work, source)
        for part, command in SUBPROCESS_PARTS.items():
            if part in args.parts:
                say(f"== {part}: {PARTS[part]}")
                with guarded(part):
                    subprocess_part(run, part, command)
    run.json["wall_seconds"] = time.monotonic() - started
    return facts


def write_json(
    run: Run, facts: machine.Machine, args: argparse.Namespace, lines: list[str]
) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    run.json.update({
        "machine": facts.to_json(),
        "args": {"parts": args.parts, "seconds": args.seconds, "size": args.size,
                 "jobs": [j.name for j in run.jobs]},
        "systems": {s.name: {"label": s.label, "servers": s.servers, "others": s.others,
                             "idle_cpu_percent": run.idle_cpu.get(s.name),
                             "pids": run.pids.get(s.name, [])} for s in run.systems},
        "cluster_pids": run.pids.get("cluster", []),
        "results": {name: {job: (r.to_json() if isinstance(r, JobResult) else {"error": r})
                           for job, r in by_job.items()} for name, by_job in run.results.items()},
        "measures": run.measures,
        "part_seconds": run.part_seconds,
        "failures": run.failures,
        "summary": lines,
    })  # fmt: skip
    path = args.out / f"bench-{stamp}.json"
    path.write_text(json.dumps(run.json, indent=2))
    say(f"(bench took {run.json['wall_seconds']:.0f} s; results in {path})")
