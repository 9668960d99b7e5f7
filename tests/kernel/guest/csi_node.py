#!/usr/bin/python3
"""Guest scenarios: lunastor's CSI node plugin in the guest, called the way kubelet calls it.

The plugin (`lunastor-csi --mode node`, the host's venv and checkout over 9p) drives the
guest's open-iscsi, mkfs and mount. This program is kubelet: NodeGetInfo, then for each
volume NodeStage / NodePublish / NodeGetVolumeStats / NodeExpand / NodeUnpublish /
NodeUnstage over the plugin's unix socket. The host is the controller side: it runs
`lunastor-csi --mode controller` in the namespace and answers `create-*`, `expand` and
`kill-chunk` requests with CreateVolume + ControllerPublishVolume, ControllerExpandVolume
and a chunk server's SIGKILL.

One boot runs the scenarios in this order (each is a `part` with its own result line):
csi-ext4, csi-xfs, csi-block, csi-two-luns, csi-stats, csi-expand, csi-restart,
csi-chunk-kill, csi-chap. csi-stats to csi-chunk-kill work on the volume csi-two-luns leaves
staged.

params.json: python, repo, portal, route, host, node, zone, size, xfs_size (mkfs.xfs needs
300 MiB), expand_to, files_after.
"""

from __future__ import annotations

import json
import os
import sys

if os.environ.get("LUNASTOR_CSI_GUEST") != "1":  # run again under the venv: grpc, lunastor
    _params = json.loads(open(os.path.join(sys.argv[1], "params.json")).read())  # noqa: SIM115
    _env = dict(os.environ, LUNASTOR_CSI_GUEST="1")
    _env["PYTHONPATH"] = f"{os.path.dirname(os.path.abspath(__file__))}:{_params['repo']}"
    os.execve(
        _params["python"], [_params["python"], os.path.abspath(__file__), *sys.argv[1:]], _env
    )

import asyncio
import signal
import subprocess
import time
from typing import Any

import grpc
import initiator
from cluster_flow import Writer, mismatches, write_file
from steps import Run, StepFailed, main, wait_for

from lunastor.csi import csi_pb2 as pb
from lunastor.csi.client import CsiClient

SOCKET = "/run/csi/csi.sock"
STAGING = "/run/kubelet/staging"
PODS = "/run/kubelet/pods"
Mode = pb.VolumeCapability.AccessMode.Mode
MiB = 1 << 20


def capability(fs: str) -> pb.VolumeCapability:
    mode = pb.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER)
    if fs == "block":
        return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=mode)
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type=fs), access_mode=mode)


class Kubelet:
    """What kubelet does with a CSI node plugin: start it, call it, notice it died."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.loop = asyncio.new_event_loop()
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: CsiClient | None = None

    def start_plugin(self) -> None:
        p = self.run.params
        log = open("/results/csi-node.log", "ab")  # noqa: SIM115 (the plugin keeps it)
        argv = [p["python"], "-m", "lunastor.csi.main", "--mode", "node"]
        argv += ["--endpoint", f"unix://{SOCKET}", "--set", f"zone={p['zone']}"]
        env = dict(os.environ, PYTHONPATH=p["repo"], PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        started = time.monotonic()
        wait_for(
            lambda: self.proc is None or self.proc.poll() is not None or self._probe(),
            600,  # Python importing grpc over 9p under TCG: 13-80 s, minutes on a loaded host
            "the node plugin to answer Probe",
            interval=0.5,
        )
        if self.proc.poll() is not None:
            raise StepFailed(f"the node plugin exited {self.proc.returncode}")
        self.run.message(f"node plugin {self.proc.pid} ready in {time.monotonic() - started:.1f}s")

    def _probe(self) -> bool:
        if not os.path.exists(SOCKET):
            return False
        try:
            self.call("Probe", pb.ProbeRequest(), timeout=30)
        except grpc.aio.AioRpcError:
            # a fresh channel next time: a failed one backs off reconnecting for up to 2 min
            self._close_client()
            return False
        return True

    def kill_plugin(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._close_client()

    def _close_client(self) -> None:
        if self.client is not None:
            self.loop.run_until_complete(self.client.close())
            self.client = None

    def call(self, rpc: str, request: Any, timeout: float = 180) -> Any:
        if self.client is None:

            async def connect() -> CsiClient:
                return CsiClient(f"unix://{SOCKET}")

            self.client = self.loop.run_until_complete(connect())
        return self.loop.run_until_complete(self.client.call(rpc, request, timeout=timeout))

    def fails(self, code: grpc.StatusCode, rpc: str, request: Any) -> None:
        try:
            self.call(rpc, request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != code:
                raise StepFailed(
                    f"{rpc}: {exc.code().name} {exc.details()}, expected {code.name}"
                ) from None
            return
        raise StepFailed(f"{rpc} succeeded, expected {code.name}")

    def stop(self) -> None:
        self._close_client()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.proc.wait(30) != 0:
                raise StepFailed(f"the node plugin exited {self.proc.returncode} on SIGTERM")


class Volume:
    """One volume as kubelet handles it: created and published by the host (the controller),
    then staged and published here."""

    def __init__(self, kubelet: Kubelet, tag: str, fs: str, size: int) -> None:
        self.k = kubelet
        self.tag = tag
        self.fs = fs
        self.size = size
        self.staging = f"{STAGING}/{tag}"
        self.target = f"{PODS}/{tag}/dev" if fs == "block" else f"{PODS}/{tag}/mount"
        self.id = ""
        self.publish: dict[str, str] = {}
        self.context: dict[str, str] = {}

    def create(self, run: Run, node_id: str) -> None:
        request = {"name": f"pvc-{self.tag}", "size": self.size, "fs": self.fs, "node": node_id}
        answer = json.loads(run.ask_host(f"create-{self.tag}", 120, json.dumps(request)))
        self.id = answer["volume_id"]
        self.publish = answer["publish_context"]
        self.context = answer["volume_context"]

    def stage_request(self, secrets: dict[str, str] | None = None) -> Any:
        return pb.NodeStageVolumeRequest(
            volume_id=self.id,
            publish_context=self.publish,
            staging_target_path=self.staging,
            volume_capability=capability(self.fs),
            volume_context=self.context,
            secrets=secrets or {},
        )

    def stage(self, secrets: dict[str, str] | None = None) -> None:
        self.k.call("NodeStageVolume", self.stage_request(secrets))

    def publish_to_pod(self, readonly: bool = False, target: str = "") -> None:
        self.k.call(
            "NodePublishVolume",
            pb.NodePublishVolumeRequest(
                volume_id=self.id,
                publish_context=self.publish,
                staging_target_path=self.staging,
                target_path=target or self.target,
                volume_capability=capability(self.fs),
                readonly=readonly,
                volume_context=self.context,
            ),
        )

    def unpublish(self, target: str = "") -> None:
        self.k.call(
            "NodeUnpublishVolume",
            pb.NodeUnpublishVolumeRequest(volume_id=self.id, target_path=target or self.target),
        )

    def unstage(self) -> None:
        self.k.call(
            "NodeUnstageVolume",
            pb.NodeUnstageVolumeRequest(volume_id=self.id, staging_target_path=self.staging),
        )

    def stats(self) -> Any:
        return self.k.call(
            "NodeGetVolumeStats",
            pb.NodeGetVolumeStatsRequest(volume_id=self.id, volume_path=self.target),
        )


def mounted_fs(path: str) -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == path:
                return right.split()[0]
    return ""


def iscsi_sessions() -> list[str]:
    try:
        return sorted(os.listdir("/sys/class/iscsi_session"))
    except FileNotFoundError:
        return []


def write_files(directory: str, sizes: dict[str, int]) -> dict[str, str]:
    os.makedirs(directory, exist_ok=True)
    return {
        f"{directory}/{n}": write_file(f"{directory}/{n}", os.urandom(s)) for n, s in sizes.items()
    }


FILES = {"small.bin": 4096, "odd.bin": MiB + 4321, "big.bin": 8 * MiB}


def filesystem(run: Run, k: Kubelet, node_id: str, fs: str) -> None:
    """csi-ext4 / csi-xfs: the whole lifecycle, every call twice, data across a re-stage."""
    run.part = f"csi-{fs}"
    vol = Volume(k, fs, fs, run.params["xfs_size" if fs == "xfs" else "size"])
    with run.step("create-publish"):
        vol.create(run, node_id)
    with run.step("stage"):
        vol.stage()
        vol.stage()  # idempotent
        if mounted_fs(vol.staging) != fs:
            raise StepFailed(f"{vol.staging} holds {mounted_fs(vol.staging)!r}, not {fs}")
    with run.step("publish"):
        vol.publish_to_pod()
        vol.publish_to_pod()
        if mounted_fs(vol.target) != fs:
            raise StepFailed(f"{vol.target} is not a bind mount of the {fs} volume")
    with run.step("write-files"):
        digests = write_files(vol.target, FILES)
    with run.step("unpublish-unstage"):
        vol.unpublish()
        vol.unpublish()
        vol.unstage()
        vol.unstage()
        if os.path.exists(vol.target) or mounted_fs(vol.staging):
            raise StepFailed("the pod path or the staging mount is still there")
        if iscsi_sessions():
            raise StepFailed(f"sessions left after the last unstage: {iscsi_sessions()}")
    with run.step("restage-verify"):
        vol.stage()
        vol.publish_to_pod()
        bad = mismatches(digests)
        if bad:
            raise StepFailed(f"files changed across unstage and stage: {bad}")
        vol.unpublish()
        vol.unstage()


def block(run: Run, k: Kubelet, node_id: str) -> None:
    """csi-block: the disk bind-mounted on a file; direct IO through it; a read-only publish."""
    run.part = "csi-block"
    vol = Volume(k, "block", "block", run.params["size"])
    with run.step("create-publish"):
        vol.create(run, node_id)
    with run.step("stage-publish"):
        vol.stage()
        vol.stage()
        vol.publish_to_pod()
        vol.publish_to_pod()
        if not os.path.exists(vol.target) or mounted_fs(vol.target) != "devtmpfs":
            raise StepFailed(f"{vol.target} is not the disk bind-mounted")
    pattern = os.urandom(4 * MiB)
    with run.step("direct-io"):
        with open("/tmp/pattern", "wb") as f:
            f.write(pattern)
        run.sh("dd", "if=/tmp/pattern", f"of={vol.target}", "bs=1M", "oflag=direct", "conv=fsync")
        back = run.sh("dd", f"if={vol.target}", "of=/tmp/back", "bs=1M", "count=4", "iflag=direct")
        with open("/tmp/back", "rb") as f:
            if f.read() != pattern:
                raise StepFailed("the 4 MiB read back through the published file differ")
        del back
    ro = f"{PODS}/block-ro/dev"
    with run.step("read-only-publish"):
        vol.publish_to_pod(readonly=True, target=ro)
        denied = run.sh(
            "dd", "if=/tmp/pattern", f"of={ro}", "bs=1M", "count=1", "oflag=direct", check=False
        )
        if denied.returncode == 0:
            raise StepFailed("a write through the read-only publish succeeded")
        vol.unpublish(ro)
    with run.step("stats"):
        usage = vol.stats().usage
        if [u.total for u in usage] != [vol.size]:
            raise StepFailed(f"stats of the raw volume: {usage}")
    with run.step("unpublish-unstage"):
        vol.unpublish()
        vol.unstage()
        vol.unstage()
        if iscsi_sessions():
            raise StepFailed(f"sessions left after the last unstage: {iscsi_sessions()}")


def two_luns(run: Run, k: Kubelet, node_id: str) -> tuple[Volume, Writer]:
    """csi-two-luns: two volumes of one target; one is unstaged while the other keeps writing."""
    run.part = "csi-two-luns"
    a = Volume(k, "two-a", "ext4", run.params["size"])
    b = Volume(k, "two-b", "ext4", run.params["size"])
    with run.step("create-publish"):
        a.create(run, node_id)
        b.create(run, node_id)
        if a.publish["targetIqn"] != b.publish["targetIqn"]:
            raise StepFailed(
                f"the two volumes are on {a.publish['targetIqn']} and {b.publish['targetIqn']}"
            )
    with run.step("stage-publish-both"):
        for v in (a, b):
            v.stage()
            v.publish_to_pod()
        if len(iscsi_sessions()) != 1:
            raise StepFailed(f"expected one session for the target, got {iscsi_sessions()}")
    writer = Writer(f"{b.target}/w", 128 * 1024)
    with run.step("writer-start"):
        writer.start()
        wait_for(lambda: len(writer.done) >= 4, 60, "the writer's first files")
    with run.step("unstage-one"):
        a_digests = write_files(a.target, {"a.bin": MiB})
        a.unpublish()
        a.unstage()
        before = len(writer.done)
        if len(iscsi_sessions()) != 1:
            raise StepFailed(f"the target's session went with the first volume: {iscsi_sessions()}")
    with run.step("other-keeps-writing"):
        wait_for(lambda: len(writer.done) >= before + 8, 60, "8 more files on the staged volume")
        if writer.error is not None:
            raise StepFailed(f"the writer failed: {writer.error}")
    with run.step("first-again"):
        a.stage()
        a.publish_to_pod()
        bad = mismatches(a_digests)
        if bad:
            raise StepFailed(f"the first volume's file changed: {bad}")
        a.unpublish()
        a.unstage()
    run.record("two_luns_files", len(writer.done))
    return b, writer


def stats(run: Run, vol: Volume) -> None:
    run.part = "csi-stats"
    with run.step("stats"):
        got = vol.stats()
        st = os.statvfs(vol.target)
        by_unit = {u.unit: u for u in got.usage}
        nbytes = by_unit[pb.VolumeUsage.BYTES]
        inodes = by_unit[pb.VolumeUsage.INODES]
        if nbytes.total != st.f_blocks * st.f_frsize or inodes.total != st.f_files:
            raise StepFailed(f"stats {got.usage} against statvfs {st}")
        if not 0 < nbytes.used < nbytes.total or got.volume_condition.abnormal:
            raise StepFailed(f"stats {got}")
        run.record(
            "stats",
            {
                "bytes_used": nbytes.used,
                "inodes_used": inodes.used,
                "condition": got.volume_condition.message,
            },
        )
    with run.step("stats-errors"):
        vol.k.fails(
            grpc.StatusCode.NOT_FOUND,
            "NodeGetVolumeStats",
            pb.NodeGetVolumeStatsRequest(volume_id=vol.id, volume_path="/run/kubelet/nothing"),
        )
        vol.k.fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            "NodeGetVolumeStats",
            pb.NodeGetVolumeStatsRequest(volume_id=vol.id),
        )


def expand(run: Run, vol: Volume, writer: Writer) -> None:
    run.part = "csi-expand"
    before = os.statvfs(vol.target)
    with run.step("controller-expand"):
        answer = json.loads(
            run.ask_host(
                "expand", 60, json.dumps({"volume_id": vol.id, "size": run.params["expand_to"]})
            )
        )
        if not answer["node_expansion_required"]:
            raise StepFailed("ControllerExpandVolume said no node expansion is needed")
    with run.step("node-expand"):
        got = vol.k.call(
            "NodeExpandVolume",
            pb.NodeExpandVolumeRequest(
                volume_id=vol.id,
                volume_path=vol.target,
                capacity_range=pb.CapacityRange(required_bytes=run.params["expand_to"]),
                volume_capability=capability("ext4"),
            ),
        )
        if got.capacity_bytes != run.params["expand_to"]:
            raise StepFailed(f"NodeExpandVolume answered {got.capacity_bytes}")
    after = os.statvfs(vol.target)
    grown = (after.f_blocks * after.f_frsize) - (before.f_blocks * before.f_frsize)
    run.record("fs_grown_bytes", grown)
    with run.step("fs-grew"):
        if grown < 0.9 * (run.params["expand_to"] - vol.size):
            raise StepFailed(f"the file system grew {grown} bytes")
        n = len(writer.done)
        wait_for(lambda: len(writer.done) >= n + 4, 60, "4 more files after the expansion")


def restart(run: Run, k: Kubelet, vol: Volume, writer: Writer) -> None:
    """csi-restart: SIGKILL the plugin while a pod writes; a new one answers NodeStage and
    NodePublish of the volume from what the node has; IO never noticed."""
    run.part = "csi-restart"
    with run.step("sigkill-plugin"):
        n = len(writer.done)
        k.kill_plugin()
        wait_for(
            lambda: len(writer.done) >= n + 4, 60, "the pod to keep writing without the plugin"
        )
    with run.step("plugin-start"):
        k.start_plugin()
    with run.step("stage-publish-again"):
        vol.stage()
        vol.publish_to_pod()
        got = vol.stats()
        if got.volume_condition.abnormal:
            raise StepFailed(f"condition after the restart: {got.volume_condition.message}")
    if writer.error is not None:
        raise StepFailed(f"the writer failed: {writer.error}")


def chunk_kill(run: Run, k: Kubelet, vol: Volume, writer: Writer) -> None:
    """csi-chunk-kill: the chunk server holding the session is SIGKILLed while the pod writes;
    every fsync'ed file reads back after a fresh stage (reads come from the cluster)."""
    run.part = "csi-chunk-kill"
    with run.step("kill-chunk-server"):
        before = initiator.current_portal(vol.publish["targetIqn"])
        asked = time.monotonic()
        run.ask_host("kill-chunk", 60)
    with run.step("writes-continue"):
        n = len(writer.done)
        wait_for(
            lambda: len(writer.done) >= n + run.params["files_after"],
            120,
            "the writer after the kill",
        )
        run.record("io_gap_seconds", round(writer.longest_gap(asked), 2))
        run.record(
            "chunk_kill_portals",
            f"{before} -> {initiator.current_portal(vol.publish['targetIqn'])}",
        )
    with run.step("verify-after-restage"):
        writer.finish(60)
        vol.unpublish()
        vol.unstage()
        vol.stage()
        vol.publish_to_pod()
        bad = mismatches(writer.digests)
        run.record("corrupted_files", len(bad))
        run.record("fsynced_files", len(writer.digests))
        if bad:
            raise StepFailed(f"{len(bad)} fsync'ed files differ: {bad[:5]}")
        vol.unpublish()
        vol.unstage()
        if iscsi_sessions():
            raise StepFailed(f"sessions left: {iscsi_sessions()}")


def chap(run: Run, k: Kubelet, node_id: str) -> None:
    """csi-chap: the target's CHAP on (host, REST); NodeStage without the node-stage secret
    and with a wrong one is PERMISSION_DENIED and leaves no session; with it, the volume
    stages, mounts and takes a file."""
    run.part = "csi-chap"
    vol = Volume(k, "chap", "ext4", run.params["size"])
    iqn = ""
    with run.step("create-publish-chap-on"):
        vol.create(run, node_id)
        iqn = vol.publish["targetIqn"]
        secret = json.loads(run.ask_host("chap-on", 60, iqn))

    def refused(secrets: dict[str, str]) -> bool:
        try:
            vol.stage(secrets)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
                raise StepFailed(f"NodeStage: {exc.code().name} {exc.details()}") from None
            if iscsi_sessions():
                raise StepFailed(f"a refused login left sessions: {iscsi_sessions()}") from None
            return True
        vol.unstage()  # the CHAP change has not reached the access point yet: again
        return False

    with run.step("without-secret-refused"):
        wait_for(lambda: refused({}), 60, "a login without CHAP to be refused", interval=1)
    with run.step("wrong-secret-refused"):
        if not refused({"username": secret["username"], "password": "wrong-secret-0123"}):
            raise StepFailed("a wrong CHAP secret was accepted")
    with run.step("stage-with-secret"):
        vol.stage(secret)
        vol.publish_to_pod()
        digests = write_files(vol.target, {"chap.bin": MiB})
        if mismatches(digests):
            raise StepFailed("the file written under CHAP differs")
        vol.unpublish()
        vol.unstage()
    with run.step("chap-off"):
        run.ask_host("chap-off", 60, iqn)


def scenario(run: Run) -> None:
    p = run.params
    k = Kubelet(run)
    run.part = "csi-ext4"
    with run.step("iscsid"):
        run.sh("ip", "route", "add", p["route"], "via", p["host"])
        initiator.start_iscsid(run, p["node"])
        for tool in ("mkfs.xfs", "mkfs.ext4", "resize2fs", "xfs_growfs", "blkid"):
            run.sh("sh", "-c", f"command -v {tool}")
    with run.step("plugin-start"):
        k.start_plugin()
    with run.step("node-get-info"):
        info = k.call("NodeGetInfo", pb.NodeGetInfoRequest())
        if info.node_id != p["node"] or dict(info.accessible_topology.segments) != {
            "topology.lunastor.io/zone": p["zone"]
        }:
            raise StepFailed(f"NodeGetInfo: {info}")
    node_id = info.node_id
    filesystem(run, k, node_id, "ext4")
    filesystem(run, k, node_id, "xfs")
    block(run, k, node_id)
    vol, writer = two_luns(run, k, node_id)
    stats(run, vol)
    expand(run, vol, writer)
    restart(run, k, vol, writer)
    chunk_kill(run, k, vol, writer)
    chap(run, k, node_id)
    with run.step("plugin-stop"):
        k.stop()


if __name__ == "__main__":
    main("csi-node", scenario)
