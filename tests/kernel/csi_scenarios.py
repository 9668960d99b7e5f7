"""CSI node scenarios (issue 15): lunastor's node plugin in the QEMU guest, driven by the
guest as kubelet would (guest/csi_node.py), against a dev cluster in the guest's namespace.

The host is the Kubernetes control plane's side: `lunastor-csi --mode controller` runs in the
namespace (it reaches the REST API there) on a unix socket in the run directory, and the
host's actions call it over gRPC: CreateVolume + ControllerPublishVolume to the node's id,
ControllerExpandVolume; `kill-chunk` SIGKILLs the chunk server holding the guest's session.

One boot carries every scenario; each gets its own line (see tests/kernel/README.md, "CSI").
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lunastor.csi import csi_pb2 as pb
from lunastor.csi.client import CsiClient
from tests.kernel.cluster import ClusterError, NetCluster, unmount_below, wait_until
from tests.kernel.cluster_scenarios import HostSide, split_parts
from tests.kernel.harness import Action, BootFiles, Guest, GuestNet
from tests.kernel.initramfs import GUEST_DIR
from tests.kernel.scenarios import MIB, ScenarioResult
from tests.kernel.target import REPO

CSI_NAMES = (
    "csi-ext4",
    "csi-xfs",
    "csi-block",
    "csi-two-luns",
    "csi-stats",
    "csi-expand",
    "csi-restart",
    "csi-chunk-kill",
    "csi-chap",
)
NODE = "iqn.2026-11.io.lunastor.test:csi-node"
SIZE = 128 * MIB
GROWN = 192 * MIB
XFS_SIZE = 320 * MIB  # mkfs.xfs refuses file systems under 300 MiB
CREATES = ("ext4", "xfs", "block", "two-a", "two-b", "chap")
CHAP = {"username": "csi-node", "password": "chap-secret-0123"}
Mode = pb.VolumeCapability.AccessMode.Mode


def capability(fs: str) -> pb.VolumeCapability:
    mode = pb.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER)
    if fs == "block":
        return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=mode)
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type=fs), access_mode=mode)


class Controller:
    """The controller plugin in the namespace, called over its unix socket."""

    def __init__(self, net: GuestNet, cluster: NetCluster, workdir: Path) -> None:
        self.socket = workdir.resolve() / "controller.sock"
        argv = [sys.executable, "-m", "lunastor.csi.main", "--mode", "controller"]
        argv += ["--endpoint", f"unix://{self.socket}"]
        argv += ["--set", f"api_url={cluster.state['api_url']}"]
        argv += ["--set", f"api_token={cluster.state['csi_token']}"]
        self.proc = net.popen(argv, log=workdir / "controller.log")
        wait_until(lambda: self.socket.exists(), 60, "the controller plugin's socket")

    def call(self, rpc: str, request: Any) -> Any:
        async def one() -> Any:
            client = CsiClient(f"unix://{self.socket}")
            try:
                return await client.call(rpc, request, timeout=60)
            finally:
                await client.close()

        return asyncio.run(one())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


def run_csi_scenarios(
    names: list[str], boot: BootFiles, workdir: Path, build_dir: Path
) -> Iterator[ScenarioResult]:
    unmount_below(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    host = HostSide()
    with GuestNet() as net:
        started = time.monotonic()
        cluster = NetCluster(net, workdir / "cluster")
        controller: Controller | None = None
        try:
            try:
                cluster.start()
                controller = Controller(net, cluster, workdir)
            except ClusterError as exc:
                for name in names:
                    yield ScenarioResult(name, False, None, {}, [str(exc)], workdir)
                return
            host.steps["csi-ext4"] = {"cluster-start": time.monotonic() - started}
            actions = _actions(controller, cluster, host)
            params: dict[str, Any] = {
                "python": sys.executable,
                "repo": str(REPO),
                "portal": cluster.portal,
                "route": cluster.route,
                "host": net.host_addr,
                "node": NODE,
                "zone": "zone1",
                "size": SIZE,
                "xfs_size": XFS_SIZE,
                "expand_to": GROWN,
                "files_after": 16,
            }
            guest = Guest(net, workdir / "guest", boot, memory_mb=768)
            # about 5 min on a quiet machine; 14 min seen at a load average of 40
            result = guest.run(GUEST_DIR / "csi_node.py", params, 1800, actions)
            data = result.data
            if "fs_grown_bytes" in data:
                host.note("csi-expand", f"ext4 grew {data['fs_grown_bytes'] / MIB:.0f} MiB online")
            if "io_gap_seconds" in data:
                host.note("csi-chunk-kill", f"IO gap {data['io_gap_seconds']:.2f}s")
                host.note(
                    "csi-chunk-kill",
                    f"corrupted files {data.get('corrupted_files', '?')}"
                    f" of {data.get('fsynced_files', '?')} fsynced",
                )
                host.note("csi-chunk-kill", str(data.get("chunk_kill_portals", "")))
            if "two_luns_files" in data:
                host.note("csi-two-luns", f"{data['two_luns_files']} files written meanwhile")
            yield from split_parts(result, CSI_NAMES, names, host, workdir)
        finally:
            if controller is not None:
                controller.stop()
            cluster.close()


def _actions(controller: Controller, cluster: NetCluster, host: HostSide) -> dict[str, Action]:
    def create(tag: str) -> Action:
        part = {"two-a": "csi-two-luns", "two-b": "csi-two-luns"}.get(tag, f"csi-{tag}")

        def action(argument: str) -> str:
            asked = json.loads(argument)
            cap = capability(asked["fs"])
            with host.timed(part, f"create-{tag}"):
                vol = controller.call(
                    "CreateVolume",
                    pb.CreateVolumeRequest(
                        name=asked["name"],
                        capacity_range=pb.CapacityRange(required_bytes=asked["size"]),
                        volume_capabilities=[cap],
                        parameters={"replicas": "3"},
                    ),
                ).volume
                published = controller.call(
                    "ControllerPublishVolume",
                    pb.ControllerPublishVolumeRequest(
                        volume_id=vol.volume_id, node_id=asked["node"], volume_capability=cap
                    ),
                )
            return json.dumps(
                {
                    "volume_id": vol.volume_id,
                    "volume_context": dict(vol.volume_context),
                    "publish_context": dict(published.publish_context),
                }
            )

        return action

    def expand(argument: str) -> str:
        asked = json.loads(argument)
        with host.timed("csi-expand", "controller-expand"):
            got = controller.call(
                "ControllerExpandVolume",
                pb.ControllerExpandVolumeRequest(
                    volume_id=asked["volume_id"],
                    capacity_range=pb.CapacityRange(required_bytes=asked["size"]),
                    volume_capability=capability("ext4"),
                ),
            )
        return json.dumps(
            {
                "capacity_bytes": got.capacity_bytes,
                "node_expansion_required": got.node_expansion_required,
            }
        )

    def kill_chunk(_: str) -> str:
        holders = cluster.session_holders()
        if len(holders) != 1:
            raise ClusterError(f"the guest's session is on {holders}, expected one server")
        with host.timed("csi-chunk-kill", "sigkill"):
            cluster.kill(holders[0])
        host.note("csi-chunk-kill", f"killed {holders[0]}")
        return holders[0]

    def chap_on(iqn: str) -> str:
        with host.timed("csi-chap", "chap-on"):
            body = {"user": CHAP["username"], "secret": CHAP["password"]}
            cluster.api("PUT", f"/v1/targets/{iqn}/chap", body)
        return json.dumps(CHAP)  # what the StorageClass's node-stage Secret would hold

    def chap_off(iqn: str) -> str:
        cluster.api("DELETE", f"/v1/targets/{iqn}/chap", ok=(204,))
        return "off"

    actions: dict[str, Action] = {f"create-{tag}": create(tag) for tag in CREATES}
    actions["chap-on"] = chap_on
    actions["chap-off"] = chap_off
    actions["expand"] = expand
    actions["kill-chunk"] = kill_chunk
    return actions
