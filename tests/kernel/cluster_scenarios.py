"""The kernel-initiator scenarios against the dev cluster (issue 8), one namespace for all.

The dev cluster (`cluster.py`: etcd, meta, three chunk servers, the redirector holding its VIP)
runs in the guest's namespace. Two kinds of boots use it:

- one boot of `guest/cluster_flow.py` carries four scenarios, in this order: node-flow (1),
  expand (2), fstrim (6) and failover (3, last: it kills a chunk server). Each gets its own
  result line, from the guest steps tagged with its name and the host actions it asked for.
- power-loss (7): the host chunk servers are stopped, a chunk server runs in the guest
  (`guest/power_loss.py`) and serves a 1-replica volume to tests/tools/verified_writer.c on
  the host; QEMU is SIGKILLed mid-run, the guest boots again over the same virtio disk and the
  host reads every block back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
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
POWER_LOSS = "power-loss"
NAMES = (*FLOW, *FEATURES, POWER_LOSS)
GAP_GOAL = 5.0  # seconds, the failover's goal
FLOW_SIZE = 256 * MIB
FLOW_GROWN = 384 * MIB
REPLICAS = 3
PL_SIZE = 64 * MIB
PL_BLOCKS = 64
PL_ACKS_BEFORE_CUT = 3 * PL_BLOCKS  # three whole rounds of the writer, then the power goes


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
        cluster = NetCluster(net, workdir / "cluster")
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
            if POWER_LOSS in names:
                yield _power_loss(cluster, net, boot, workdir / POWER_LOSS, build_dir, setup)
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

    def kill_chunk(_: str) -> str:
        holders = cluster.session_holders()
        if len(holders) != 1:
            raise ClusterError(f"the guest's session is on {holders}, expected one server")
        with host.timed("failover", "sigkill"):
            cluster.kill(holders[0])
        host.note("failover", f"killed {holders[0]}")
        return holders[0]

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
        "replacement_timeout": 15,
        "failover_files_after": 16,
        "gap_goal": GAP_GOAL,
    }
    guest = Guest(net, workdir, boot)
    result = guest.run(GUEST_DIR / "cluster_flow.py", params, 900, actions)
    yield from split_parts(result, FLOW, wanted, host, workdir)


def _notes(part: str, data: dict[str, Any]) -> list[str]:
    if part == "node-flow":
        return [f"node1 on {data.get('node1_portal')}", f"node2 on {data.get('node2_portal')}"]
    if part == "expand" and "fs_grown_bytes" in data:
        return [f"ext4 grew {data['fs_grown_bytes'] / MIB:.0f} MiB online"]
    if part == "failover" and "io_gap_seconds" in data:
        return [
            f"IO gap {data['io_gap_seconds']:.2f}s (goal < {GAP_GOAL:.0f}s)",
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
    cluster: NetCluster,
    net: GuestNet,
    boot: BootFiles,
    workdir: Path,
    build_dir: Path,
    setup: float,
) -> ScenarioResult:
    workdir.mkdir(parents=True)
    host = HostSide()
    part = POWER_LOSS
    if setup:
        host.steps[part] = {"cluster-start": setup}
    with host.timed(part, "stop-host-chunk-servers"):
        for name in cluster.chunk_names():
            with contextlib.suppress(ClusterError):  # the failover scenario killed one
                cluster.stop_daemon(name)
    tool = writer.build(build_dir)
    vol = cluster.create_volume("power-loss", PL_SIZE, 1, [WRITER_IQN])
    disk = workdir / "chunk-disk.img"
    with open(disk, "wb") as f:
        f.truncate(1024 * MIB)
    guest_addr = net.guest_addr
    config = {
        "data_dirs": ["/mnt/chunk/data"],
        "zone": "guest",
        "iscsi_listen": f"{guest_addr}:3260",
        "data_listen": f"{guest_addr}:3270",
        "admin_listen": f"{guest_addr}:9100",
        # a loaded TCG guest can stall for a second or two; the host ones run with 2 s
        "lease_ttl": 5.0,
        "cluster_secret": cluster.secret("cluster-secret"),
        "secret_key": cluster.secret("secret-key"),
        # one request may take a while from a TCG guest (5 s by default)
        "etcd": {"endpoints": [cluster.etcd_endpoint], "namespace": "/lunastor", "timeout": 30.0},
        "log": {"level": "info", "format": "kv"},
    }
    params: dict[str, Any] = {
        "route": cluster.route,
        "host": net.host_addr,
        "repo": str(REPO),
        "config": to_toml_table(config),
        "admin": f"{guest_addr}:9100",
        "etcd": cluster.etcd_endpoint,
        "portal": f"{guest_addr}:3260",
    }
    params["python"] = sys.executable  # the host's venv: its root is the guest's too, over 9p
    stride = PL_SIZE // PL_BLOCKS
    url = f"iscsi://{cluster.portal}/{vol['target_iqn']}/{vol['lun']}"
    out, err = workdir / "writer.out", workdir / "writer.err"
    cut: dict[str, float] = {}

    def power_cut(_: str) -> str:
        # the guest's chunk server answers /healthz before it is registered; the writer's
        # login needs the redirector to know it
        with host.timed(part, "chunk-known"):
            ours = wait_until(lambda: cluster.up_in_zone("guest"), 60, "the guest's chunk server")
            wait_until(
                lambda: ours[0] in cluster.redirect_targets(), 30, "the redirector to see it"
            )
        with out.open("w") as stdout, err.open("w") as stderr:
            argv = [str(tool), url, WRITER_IQN, str(PL_BLOCKS), str(stride), str(workdir / "stop")]
            proc = subprocess.Popen(net.cmd(argv), stdout=stdout, stderr=stderr)
        try:
            with host.timed(part, "writer-until-cut"):
                wait_until(
                    lambda: (
                        proc.poll() is not None
                        or writer.Journal.parse(out.read_text()).acks >= PL_ACKS_BEFORE_CUT
                    ),
                    300,
                    f"{PL_ACKS_BEFORE_CUT} acknowledged writes",
                )
                if proc.poll() is not None:
                    raise ClusterError(f"the writer exited {proc.returncode}: {err.read_text()}")
            cut["at"] = time.monotonic()
            first.power_cut()
        finally:
            proc.send_signal(signal.SIGKILL)  # it would try to reconnect forever
            proc.wait(10)
        return "the power was cut"

    first = Guest(net, workdir / "boot1", boot, memory_mb=768, disk=disk)
    r1 = first.run(
        GUEST_DIR / "power_loss.py", dict(params, phase="first"), 600, {"power-cut": power_cut}
    )
    host.steps[part]["boot1"] = r1.wall_seconds
    problems: list[str] = []
    if "at" not in cut:
        problems += ["the power was never cut", f"guest {r1.status}", *r1.messages]
        view = dataclasses.replace(r1, steps=r1.steps)
        return ScenarioResult(part, False, view, host.steps[part], problems, workdir)
    journal = writer.Journal.parse(out.read_text())
    host.note(part, f"{journal.acks} FUA writes acknowledged before the cut")
    verdict: dict[str, Any] = {}

    def verify(_: str) -> str:
        image = workdir / "after.raw"
        opts = (
            f"driver=iscsi,transport=tcp,portal={cluster.portal},target={vol['target_iqn']},"
            f"lun={vol['lun']},initiator-name={WRITER_IQN}"
        )
        with host.timed(part, "read-back"):
            proc = subprocess.run(
                net.cmd(["qemu-img", "convert", "-O", "raw", "--image-opts", opts, str(image)]),
                capture_output=True,
                text=True,
                timeout=300,
            )
        if proc.returncode != 0:
            raise ClusterError(f"qemu-img convert: {proc.stderr.strip()[-500:]}")
        lost = journal.lost(image.read_bytes(), stride)
        image.unlink()
        verdict.update(acked=journal.acks, blocks=len(journal.acked), lost=len(lost))
        return json.dumps({**verdict, "detail": lost[:5]})

    second = Guest(net, workdir / "boot2", boot, memory_mb=768, disk=disk)
    r2 = second.run(
        GUEST_DIR / "power_loss.py", dict(params, phase="reboot"), 600, {"verify": verify}
    )
    host.steps[part]["boot2"] = r2.wall_seconds
    if "lost" in verdict:
        host.note(part, f"lost durable writes {verdict['lost']}")
    if not r2.passed:
        problems += [f"guest {r2.status} after the reboot", *r2.messages]
    passed = r2.passed and verdict.get("lost") == 0 and not problems
    if passed:
        disk.unlink()
    view = dataclasses.replace(r2, steps=[*r1.steps, *r2.steps])
    return ScenarioResult(part, passed, view, host.steps[part], problems, workdir, host.notes[part])
