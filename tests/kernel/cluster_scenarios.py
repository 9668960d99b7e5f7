"""The kernel-initiator scenarios against the dev cluster (issue 8), one namespace for all.

The dev cluster (`cluster.py`: etcd, meta, three chunk servers, the redirector holding its VIP)
runs in the guest's namespace. Two kinds of boots use it:

- one boot of `guest/cluster_flow.py` carries four scenarios, in this order: node-flow (1),
  expand (2), fstrim (6) and failover (3, last: it kills a chunk server). Each gets its own
  result line, from the guest steps tagged with its name and the host actions it asked for.
- power-loss (7) and powerloss (issue 14): the host chunk servers are stopped (or never
  started when only these run), chunk servers run in the guest (`guest/power_loss.py`), each on
  its own virtio disk, and serve a volume to tests/tools/verified_writer.c on the host (one
  server and 1 replica; three servers and 3 replicas); QEMU is SIGKILLed mid-run, the guest
  boots again over the same disks and the host reads every block back through every server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lunastor.common.config import to_toml_table
from tests.kernel import writer
from tests.kernel.cluster import ClusterError, NetCluster, unmount_below, wait_until
from tests.kernel.harness import Action, BootFiles, Guest, GuestNet, GuestResult
from tests.kernel.initramfs import GUEST_DIR
from tests.kernel.scenarios import MIB, ScenarioResult
from tests.kernel.target import REPO

NODE1 = "iqn.2025-01.io.lunastor.test:node1"
NODE2 = "iqn.2025-01.io.lunastor.test:node2"
WRITER_IQN = "iqn.2025-01.io.lunastor.test:host-writer"
FLOW = ("node-flow", "expand", "fstrim", "failover")  # the order the one boot runs them in
FEATURES = ("snapshot-clone", "pr-two-sessions")  # issue 8's 4 and 5: cluster_features.py
POWER_LOSS = "power-loss"  # issue 8: one chunk server in the guest, a 1-replica volume
POWERLOSS = "powerloss"  # issue 14: three chunk servers on three virtio disks, 3 replicas
NAMES = (*FLOW, *FEATURES, POWER_LOSS, POWERLOSS)
# The failover (issue 14): the host SIGKILLs the primary of the extent every fsync writes (the
# ext4 journal's); goal: every gap between fsyncs under 2 s. LUNASTOR_FAILOVER=freeze SIGSTOPs
# it instead (a frozen or cut-off server: nobody is told, its lease must run out): goal lease
# TTL + 2 s.
FAILOVER_MODE = os.environ.get("LUNASTOR_FAILOVER", "kill")
GAP_GOAL = 2.0
FREEZE_GAP_GOAL = 2.0  # over the lease TTL
# The scenario fails over this (failover broke); the goal is reported, met or missed: under
# TCG on a loaded machine the guest's own reconnect takes most of the gap (README.md).
GAP_BOUND = 5.0
# open-iscsi timers of the guest's session (the CSI node plugin sets the same keys, docs/csi.md):
# a dead connection is noticed within noop interval + timeout (3 s, so that a frozen server
# is left within its 2 s lease + 2 s), and iscsid reconnects at once (DefaultTime2Wait 0)
NODE_SETTINGS = {
    "node.session.timeo.replacement_timeout": "15",
    "node.conn[0].timeo.noop_out_interval": "1",
    "node.conn[0].timeo.noop_out_timeout": "2",
    "node.session.iscsi.DefaultTime2Wait": "0",
}
FLOW_SIZE = 256 * MIB
FLOW_GROWN = 384 * MIB
REPLICAS = 3
PL_BLOCKS = 64
PL_ACKS_BEFORE_CUT = 3 * PL_BLOCKS  # three whole rounds of the writer, then the power goes


@dataclass(frozen=True)
class PowerLossPlan:
    servers: int  # chunk servers in the guest, each on its own virtio disk and address
    replicas: int
    size: int  # of the volume; 64 MiB extents: powerloss's spans four


PLANS = {POWER_LOSS: PowerLossPlan(1, 1, 64 * MIB), POWERLOSS: PowerLossPlan(3, 3, 256 * MIB)}


@dataclass
class HostSide:
    """What the host did for each scenario: timed actions, notes and problems."""

    steps: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, part: str, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.steps.setdefault(part, {})[name] = time.monotonic() - started

    def note(self, part: str, text: str) -> None:
        self.notes.setdefault(part, []).append(text)

    def problem(self, part: str, text: str) -> None:
        self.problems.setdefault(part, []).append(text)


def stable_used(cluster: NetCluster, timeout: float = 60) -> int:
    """Used bytes once the reports stop moving for three status intervals."""
    settle = 3 * cluster.status_interval
    last, since = cluster.used_bytes(), time.monotonic()
    deadline = since + timeout
    while time.monotonic() - since < settle:
        if time.monotonic() > deadline:
            raise ClusterError(f"used bytes still moving after {timeout:.0f}s")
        time.sleep(0.2)
        now = cluster.used_bytes()
        if now != last:
            last, since = now, time.monotonic()
    return last


def _at_most(cluster: NetCluster, goal: int) -> list[int] | None:
    """[used bytes] once they are at most `goal` (a list: 0 bytes used is an answer too)."""
    used = cluster.used_bytes()
    return [used] if used <= goal else None


def run_cluster_scenarios(
    names: list[str], boot: BootFiles, workdir: Path, build_dir: Path
) -> Iterator[ScenarioResult]:
    """Namespace, dev cluster, the boots `names` need; one result per name, as they finish."""
    unmount_below(workdir)  # a crashed run may have left its tmpfs mounts behind
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    with GuestNet() as net:
        started = time.monotonic()
        # the power-loss scenarios stop the host's chunk servers: none when only they run
        chunks = 0 if set(names) <= set(PLANS) else 3
        cluster = NetCluster(net, workdir / "cluster", chunks=chunks)
        try:
            try:
                cluster.start()
            except ClusterError as exc:
                for name in names:
                    yield ScenarioResult(name, False, None, {}, [str(exc)], workdir)
                return
            setup = time.monotonic() - started
            flow = [n for n in FLOW if n in names]
            if flow:
                yield from _flow(flow, cluster, net, boot, workdir / "flow", setup)
                setup = 0.0
            features = [n for n in FEATURES if n in names]
            if features:
                from tests.kernel.cluster_features import run_features  # it imports us

                yield from run_features(features, cluster, net, boot, workdir / "features")
            for name in PLANS:
                if name in names:
                    yield _power_loss(name, cluster, net, boot, workdir / name, build_dir, setup)
                    setup = 0.0
        finally:
            cluster.close()


def _flow(
    wanted: list[str],
    cluster: NetCluster,
    net: GuestNet,
    boot: BootFiles,
    workdir: Path,
    setup: float,
) -> Iterator[ScenarioResult]:
    host = HostSide()
    if setup:
        host.steps["node-flow"] = {"cluster-start": setup}
    vol = cluster.create_volume("kernel-flow", FLOW_SIZE, REPLICAS, [NODE1])
    before: list[int] = []
    frozen: list[str] = []

    def publish_node2(_: str) -> str:
        with host.timed("node-flow", "rest-move-export"):
            cluster.publish(vol["id"], NODE2)
            cluster.unpublish(vol["id"], NODE1)
        return "exported to node2, not to node1"

    def expand(_: str) -> str:
        with host.timed("expand", "rest-expand"):
            cluster.api("POST", f"/v1/volumes/{vol['id']}/expand", {"size_bytes": FLOW_GROWN})
        return f"grown to {FLOW_GROWN}"

    def space_before(_: str) -> str:
        with host.timed("fstrim", "measure-before"):
            before.append(stable_used(cluster))
        return str(before[0])

    def space_after(argument: str) -> str:
        deleted = int(argument) * REPLICAS
        goal = before[0] - deleted // 2
        with host.timed("fstrim", "measure-after"):
            try:
                used = wait_until(lambda: _at_most(cluster, goal), 60, "the space back")[0]
            except ClusterError:
                used = cluster.used_bytes()
                host.problem("fstrim", f"less than half of {deleted >> 20} MiB came back")
        freed = before[0] - used
        host.note("fstrim", f"used {before[0] / MIB:.1f} -> {used / MIB:.1f} MiB")
        host.note("fstrim", f"freed {freed / MIB:.1f} MiB of {deleted >> 20} MiB deleted")
        return str(used)

    def kill_chunk(argument: str) -> str:
        """SIGKILL (or SIGSTOP) the primary of the extent holding byte `argument` of the disk:
        the start of the ext4 journal, which every fsync writes."""
        holders = cluster.session_holders()
        if len(holders) != 1:
            raise ClusterError(f"the guest's session is on {holders}, expected one server")
        status = cluster.api("GET", f"/v1/volumes/{vol['id']}/status")
        index = int(argument) // int(status["extent_size"])
        extent = next((e for e in status["extent_map"] if e["index"] == index), None)
        if extent is None:
            raise ClusterError(f"extent {index}, the journal's, is not allocated")
        victim = cluster.name_of(extent["replicas"][0]["chunk_id"])
        freeze = FAILOVER_MODE == "freeze"
        with host.timed("failover", "sigstop" if freeze else "sigkill"):
            if freeze:
                cluster.freeze(victim)
                frozen.append(victim)
            else:
                cluster.kill(victim)
        where = "its session's server" if victim == holders[0] else f"session on {holders[0]}"
        verb = "froze" if freeze else "killed"
        host.note("failover", f"{verb} {victim}, primary of the journal's extent {index}, {where}")
        return victim

    actions: dict[str, Action] = {
        "publish-node2": publish_node2,
        "expand": expand,
        "space-before": space_before,
        "space-after": space_after,
        "kill-chunk": kill_chunk,
    }
    params: dict[str, Any] = {
        "portal": cluster.portal,
        "route": cluster.route,
        "host": net.host_addr,
        "iqn": vol["target_iqn"],
        "lun": vol["lun"],
        "size": FLOW_SIZE,
        "node1": NODE1,
        "node2": NODE2,
        "files": {"small.bin": 4096, "odd.bin": MIB + 4321, "big.bin": 16 * MIB},
        "expand_to": FLOW_GROWN,
        "fstrim_mib": 48,
        "node_settings": NODE_SETTINGS,
        "replacement_timeout": int(NODE_SETTINGS["node.session.timeo.replacement_timeout"]),
        "failover_files_after": 16,
        "gap_goal": gap_goal(cluster),
        "gap_bound": gap_goal(cluster) - GAP_GOAL + GAP_BOUND,
    }
    guest = Guest(net, workdir, boot)
    try:
        result = guest.run(GUEST_DIR / "cluster_flow.py", params, 900, actions)
    finally:
        for name in frozen:
            cluster.thaw(name)
    yield from split_parts(result, FLOW, wanted, host, workdir)


def gap_goal(cluster: NetCluster) -> float:
    return cluster.lease_ttl + FREEZE_GAP_GOAL if FAILOVER_MODE == "freeze" else GAP_GOAL


def _notes(part: str, data: dict[str, Any]) -> list[str]:
    if part == "node-flow":
        return [f"node1 on {data.get('node1_portal')}", f"node2 on {data.get('node2_portal')}"]
    if part == "expand" and "fs_grown_bytes" in data:
        return [f"ext4 grew {data['fs_grown_bytes'] / MIB:.0f} MiB online"]
    if part == "failover" and "io_gap_seconds" in data:
        return [
            f"{FAILOVER_MODE}: IO gap {data['io_gap_seconds']:.2f}s"
            f" (goal < {data.get('gap_goal', GAP_GOAL):g}s:"
            f" {'met' if data['io_gap_seconds'] < data.get('gap_goal', GAP_GOAL) else 'MISSED'})",
            f"corrupted files {data.get('corrupted_files', '?')}"
            f" of {data.get('failover_files', '?')} + 3",
            f"{data.get('failover_portal_before')} -> {data.get('failover_portal_after')}",
        ]
    return []


def split_parts(
    result: GuestResult,
    parts: tuple[str, ...],
    wanted: list[str],
    host: HostSide,
    workdir: Path,
) -> Iterator[ScenarioResult]:
    """One ScenarioResult per scenario (`parts`, in boot order) from the steps tagged with it."""
    reached = {s.part for s in result.steps}
    failed = {s.part for s in result.steps if not s.ok}
    last = result.steps[-1].part if result.steps else parts[0]
    for i, part in enumerate(parts):
        steps = [s for s in result.steps if s.part == part]
        view = dataclasses.replace(
            result,
            steps=steps,
            boot_seconds=result.boot_seconds if i == 0 else None,
            max_rss_kb=result.max_rss_kb if part == parts[-1] else None,
        )
        problems = list(host.problems.get(part, []))
        problems += [f"{s.name}: {s.message}" for s in steps if not s.ok]
        if not result.passed and not failed and part == last:
            problems += [f"guest {result.status}", *result.messages]  # killed, or no result
        if not result.passed and part not in reached:
            problems.append("not reached")
        passed = bool(steps) and all(s.ok for s in steps) and not problems
        host_steps = dict(host.steps.get(part, {}))
        if part == parts[-1]:
            host_steps["guest"] = result.wall_seconds
        notes = host.notes.get(part, []) + _notes(part, result.data)
        if part in wanted:
            yield ScenarioResult(part, passed, view, host_steps, problems, workdir, notes)


def _power_loss(
    part: str,
    cluster: NetCluster,
    net: GuestNet,
    boot: BootFiles,
    workdir: Path,
    build_dir: Path,
    setup: float,
) -> ScenarioResult:
    plan = PLANS[part]
    workdir.mkdir(parents=True)
    host = HostSide()
    if setup:
        host.steps[part] = {"cluster-start": setup}
    with host.timed(part, "stop-host-chunk-servers"):
        for name in cluster.chunk_names():
            with contextlib.suppress(ClusterError):  # the failover scenario killed one
                cluster.stop_daemon(name)
    tool = writer.build(build_dir)
    vol = cluster.create_volume(part, plan.size, plan.replicas, [WRITER_IQN])
    servers: list[dict[str, Any]] = []
    disks: list[Path] = []
    # the chunk servers' shared secret (their data port): the supervisor makes it only when
    # it starts chunk servers of its own
    shared = cluster.directory / "cluster-secret"
    cluster_secret = shared.read_text().strip() if shared.exists() else secrets.token_urlsafe(32)
    for i in range(plan.servers):
        addr = f"{net.subnet}.{2 + i}"  # .2 is eth0's (GuestNet.guest_addr)
        config = {
            "data_dirs": [f"/mnt/chunk{i + 1}/data"],
            "zone": "guest",
            "iscsi_listen": f"{addr}:3260",
            "data_listen": f"{addr}:3270",
            "admin_listen": f"{addr}:9100",
            # a loaded TCG guest stalls for seconds (three servers on its one vCPU lost 5 s
            # leases over and over); the host ones run with 2 s
            "lease_ttl": 10.0,
            # its servers come up minutes apart under TCG on a busy machine (86 s to over 5
            # min measured), not seconds as real hosts do: the first one up waits for the
            # others (it cannot know which member is the most advanced without them) instead
            # of resuming alone after the default 30 s and re-replicating
            "restart_grace": 600.0,
            # a power loss takes the guard with its server; one Python process less under TCG
            "crash_guard": False,
            "cluster_secret": cluster_secret,
            "secret_key": cluster.secret("secret-key"),
            # one request may take a while from a TCG guest (5 s by default)
            "etcd": {
                "endpoints": [cluster.etcd_endpoint],
                "namespace": "/lunastor",
                "timeout": 30.0,
            },
            "log": {"level": "info", "format": "kv"},
        }
        servers.append(
            {
                "name": f"chunk{i + 1}",
                "disk": f"/dev/vd{'abcdefgh'[i]}",
                "mount": f"/mnt/chunk{i + 1}",
                "addr": addr,
                "config": to_toml_table(config),
                "admin": f"{addr}:9100",
                "portal": f"{addr}:3260",
            }
        )
        disks.append(workdir / f"chunk{i + 1}-disk.img")
        with open(disks[-1], "wb") as f:
            f.truncate(1024 * MIB)
    params: dict[str, Any] = {
        "part": part,
        "route": cluster.route,
        "host": net.host_addr,
        "repo": str(REPO),
        "etcd": cluster.etcd_endpoint,
        "servers": servers,
    }
    params["python"] = sys.executable  # the host's venv: its root is the guest's too, over 9p
    stride = plan.size // PL_BLOCKS
    target = f"{vol['target_iqn']}/{vol['lun']}"
    url = f"iscsi://{cluster.portal}/{target}"
    cut: dict[str, float] = {}

    def chunk_known() -> None:
        # a guest chunk server answers /healthz before it is registered; the writer's login
        # needs the redirector to know it
        with host.timed(part, "chunk-known"):
            ours = wait_until(
                lambda: (lambda up: up if len(up) == plan.servers else None)(
                    cluster.up_in_zone("guest")
                ),
                120,
                "the guest's chunk servers",
            )
            wait_until(
                lambda: set(ours) <= set(cluster.redirect_targets()),
                60,
                "the redirector to see them",
            )

    def write(name: str, acks: int) -> writer.Journal:
        """Run the writer through the VIP until `acks` acknowledgements; stop it (file)."""
        out, err, stop = (workdir / f"{name}.{ext}" for ext in ("out", "err", "stop"))
        with out.open("w") as stdout, err.open("w") as stderr:
            argv = [str(tool), url, WRITER_IQN, str(PL_BLOCKS), str(stride), str(stop)]
            proc = subprocess.Popen(net.cmd(argv), stdout=stdout, stderr=stderr)
        try:
            wait_until(
                lambda: (
                    proc.poll() is not None or writer.Journal.parse(out.read_text()).acks >= acks
                ),
                300,
                f"{acks} acknowledged writes",
            )
            if proc.poll() is not None:
                raise ClusterError(f"the writer exited {proc.returncode}: {err.read_text()}")
            if name == "before-cut":
                cut["at"] = time.monotonic()
                first.power_cut()
            else:
                stop.touch()
                proc.wait(120)
        finally:
            proc.send_signal(signal.SIGKILL)  # it would try to reconnect forever
            proc.wait(10)
        return writer.Journal.parse(out.read_text())

    def power_cut(_: str) -> str:
        chunk_known()
        with host.timed(part, "writer-until-cut"):
            write("before-cut", PL_ACKS_BEFORE_CUT)
        return "the power was cut"

    first = Guest(net, workdir / "boot1", boot, memory_mb=512 + 256 * plan.servers, disks=disks)
    r1 = first.run(
        GUEST_DIR / "power_loss.py", dict(params, phase="first"), 1200, {"power-cut": power_cut}
    )
    host.steps[part]["boot1"] = r1.wall_seconds
    problems: list[str] = []
    if "at" not in cut:
        problems += ["the power was never cut", f"guest {r1.status}", *r1.messages]
        return ScenarioResult(part, False, r1, host.steps[part], problems, workdir)
    journal = writer.Journal.parse((workdir / "before-cut.out").read_text())
    host.note(part, f"{journal.acks} FUA writes acknowledged before the cut")
    verdict: dict[str, Any] = {}

    def read_back(portal: str) -> dict[int, str] | None:
        argv = [str(tool), "--read", f"iscsi://{portal}/{target}", WRITER_IQN]
        argv += [str(PL_BLOCKS), str(stride)]
        # an extent that does not serve yet fails its reads (NOT READY, after the access
        # point's io_timeout: a pass over four such extents outlasts the time limit): again
        try:
            proc = subprocess.run(net.cmd(argv), capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return None
        reads = writer.parse_reads(proc.stdout)
        return reads if proc.returncode == 0 and len(reads) == PL_BLOCKS else None

    def verify(_: str) -> str:
        lost: set[str] = set()
        # every block, so every extent, read through every server as the access point
        for server in servers:
            with host.timed(part, f"read-via-{server['name']}"):
                reads = wait_until(
                    lambda portal=server["portal"]: read_back(portal),
                    300,
                    f"every block read through {server['name']}",
                )
            lost.update(journal.lost(reads))
        with host.timed(part, "write-after"):  # and every extent takes writes again
            after = write("after-reboot", PL_BLOCKS)
        verdict.update(acked=journal.acks, blocks=len(journal.acked), lost=len(lost))
        verdict.update(written_after=after.acks, failed_after=after.failed)
        return json.dumps({**verdict, "detail": sorted(lost)[:5]})

    second = Guest(net, workdir / "boot2", boot, memory_mb=512 + 256 * plan.servers, disks=disks)
    r2 = second.run(
        GUEST_DIR / "power_loss.py", dict(params, phase="reboot"), 1500, {"verify": verify}
    )
    host.steps[part]["boot2"] = r2.wall_seconds
    if "lost" in verdict:
        host.note(part, f"lost durable writes {verdict['lost']}")
        host.note(part, f"{verdict['written_after']} written after the reboot")
    if not r2.passed:
        problems += [f"guest {r2.status} after the reboot", *r2.messages]
    passed = r2.passed and verdict.get("lost") == 0 and not problems
    if passed:
        for disk in disks:
            disk.unlink()
    view = dataclasses.replace(r2, steps=[*r1.steps, *r2.steps])
    return ScenarioResult(part, passed, view, host.steps[part], problems, workdir, host.notes[part])
