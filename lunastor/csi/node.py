"""The CSI Node service: NodeStage logs in through the VIP and mounts (formatting a blank
disk), NodePublish bind-mounts into the pod, NodeUnstage detaches the LUN and logs the target
out once none of its LUNs is staged any more. State is read back from the node itself
(`mounts`, `initiator`), so every call is idempotent and safe after a plugin restart."""

from __future__ import annotations

import asyncio
import collections
import os
from typing import Any

import grpc

from lunastor.common.logs import get_logger
from lunastor.csi import csi_pb2 as pb
from lunastor.csi import host, mounts
from lunastor.csi.config import CsiConfig
from lunastor.csi.errors import CsiError, invalid, not_found
from lunastor.csi.initiator import Disk, Initiator
from lunastor.csi.requests import ZONE_KEY, capability_problem, fs_type_of, required

RPC = pb.NodeServiceCapability.RPC
CAPABILITIES = (
    RPC.STAGE_UNSTAGE_VOLUME,
    RPC.GET_VOLUME_STATS,
    RPC.EXPAND_VOLUME,
    RPC.VOLUME_CONDITION,
    RPC.SINGLE_NODE_MULTI_WRITER,
)
#: NodeStage secrets (a Kubernetes Secret named by the StorageClass) -> node record settings
CHAP_KEYS = {
    "username": "node.session.auth.username",
    "password": "node.session.auth.password",
    "mutualUsername": "node.session.auth.username_in",
    "mutualPassword": "node.session.auth.password_in",
}
log = get_logger(component="csi-node")


def _capability(cap: pb.VolumeCapability, present: bool) -> pb.VolumeCapability:
    if not present:
        raise invalid("volume_capability: required")
    problem = capability_problem(cap)
    if problem is not None:
        raise invalid(f"volume_capability.{problem}")
    return cap


def _chap(secrets: dict[str, str]) -> dict[str, str]:
    unknown = sorted(set(secrets) - set(CHAP_KEYS))
    if unknown:
        raise invalid(f"secrets: unknown keys {', '.join(unknown)} (known: {', '.join(CHAP_KEYS)})")
    if secrets and not {"username", "password"} <= set(secrets):
        raise invalid("secrets: CHAP needs both username and password")
    return {CHAP_KEYS[k]: v for k, v in secrets.items()}


class NodeService:
    def __init__(self, config: CsiConfig, sysfs: str = "/sys") -> None:
        self.config = config
        self.initiator = Initiator(config.iscsi, sysfs)
        self.node_id = config.node_id
        # one stage/unstage at a time per target (they log in and out of its one session)
        self._targets: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._volumes: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    async def start(self) -> None:
        if not self.node_id:
            self.node_id = self.initiator.initiator_name()

    async def probe(self) -> None:
        await host.run([self.config.iscsi.iscsiadm, "--version"], timeout=10)
        if not os.path.isdir(f"{self.initiator.sysfs}/class/iscsi_transport/tcp"):
            await host.run(["modprobe", "iscsi_tcp"], timeout=30)

    # --- helpers --------------------------------------------------------------------------

    def _staged_disk(self, staging: str) -> Disk | None:
        """The iSCSI disk staged at `staging` (file system or raw block), or None."""
        for path in (staging, os.path.join(staging, mounts.BLOCK_FILE)):
            devno = mounts.device_of(path)
            if devno is not None:
                return self.initiator.disk_by_devno(devno)
        return None

    def _disk_at(self, path: str) -> Disk | None:
        devno = mounts.device_of(path)
        return self.initiator.disk_by_devno(devno) if devno is not None else None

    # --- stage ----------------------------------------------------------------------------

    async def NodeStageVolume(
        self, req: pb.NodeStageVolumeRequest, ctx: Any
    ) -> pb.NodeStageVolumeResponse:
        required(req.volume_id, "volume_id")
        staging = required(req.staging_target_path, "staging_target_path")
        cap = _capability(req.volume_capability, req.HasField("volume_capability"))
        publish = req.publish_context
        missing = [k for k in ("portal", "targetIqn", "lun") if not publish.get(k)]
        if missing:
            raise invalid(f"publish_context: missing {', '.join(missing)} (from ControllerPublish)")
        iqn, portal = publish["targetIqn"], publish["portal"]
        try:
            lun = int(publish["lun"])
        except ValueError:
            raise invalid(f"publish_context.lun: {publish['lun']!r} is not a number") from None
        chap = _chap(dict(req.secrets))
        block = cap.HasField("block")
        read_only = publish.get("readonly") == "true"
        async with self._targets[iqn]:
            staged = self._staged_disk(staging)
            if staged is not None:
                if self.initiator.target_of(staged.session) != iqn or staged.lun != lun:
                    raise CsiError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"{staging} holds another volume ({staged.path})",
                    )
                return pb.NodeStageVolumeResponse()
            session = await self.initiator.login(portal, iqn, chap)
            disk = await self.initiator.wait_disk(iqn, session, lun)
            os.makedirs(staging, exist_ok=True)
            if block:
                target = os.path.join(staging, mounts.BLOCK_FILE)
                open(target, "a").close()
                if read_only:  # published read-only to this node: the whole disk is
                    await host.run(["blockdev", "--setro", disk.path])
                await mounts.bind(disk.path, target, read_only)
            else:
                await self._mount_fs(disk, staging, cap, dict(req.volume_context), read_only)
        log.info("staged", volume=req.volume_id, disk=disk.path, target=iqn, lun=lun)
        return pb.NodeStageVolumeResponse()

    async def _mount_fs(
        self,
        disk: Disk,
        staging: str,
        cap: pb.VolumeCapability,
        context: dict[str, str],
        read_only: bool,
    ) -> None:
        wanted = fs_type_of(cap, context)
        found = await mounts.fs_type_on(disk.path)
        if not found:
            if read_only:
                raise CsiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{disk.path} is blank and the volume is read-only: nothing to mount",
                )
            await mounts.mkfs(disk.path, wanted)
            found = wanted
        elif found != wanted:
            log.info("keeping the existing file system", disk=disk.path, found=found, wanted=wanted)
        options = list(cap.mount.mount_flags)
        if found == "xfs":
            options.append("nouuid")  # a clone carries its source's UUID
        if read_only:
            options.append("ro")
        await mounts.mount(disk.path, staging, found, options)

    async def NodeUnstageVolume(
        self, req: pb.NodeUnstageVolumeRequest, ctx: Any
    ) -> pb.NodeUnstageVolumeResponse:
        required(req.volume_id, "volume_id")
        staging = required(req.staging_target_path, "staging_target_path")
        disk = self._staged_disk(staging)
        if disk is None:  # not staged (any more): make sure nothing is left mounted there
            await mounts.umount(staging)
            await mounts.umount(os.path.join(staging, mounts.BLOCK_FILE))
            return pb.NodeUnstageVolumeResponse()
        iqn = self.initiator.target_of(disk.session)
        async with self._targets[iqn]:
            await mounts.umount(os.path.join(staging, mounts.BLOCK_FILE))
            await mounts.umount(staging)
            await self.initiator.remove_disk(disk)
            # the session goes only when no other disk of it is mounted anywhere on the node
            in_use = mounts.devices_in_use()
            others = [
                d.name
                for d in self.initiator.disks(disk.session)
                if d.name != disk.name and self.initiator.devno(d) in in_use
            ]
            if not others and self.initiator.target_of(disk.session):
                await self.initiator.logout(disk.session)
        log.info("unstaged", volume=req.volume_id, disk=disk.path, target=iqn, logout=not others)
        return pb.NodeUnstageVolumeResponse()

    # --- publish --------------------------------------------------------------------------

    async def NodePublishVolume(
        self, req: pb.NodePublishVolumeRequest, ctx: Any
    ) -> pb.NodePublishVolumeResponse:
        volume_id = required(req.volume_id, "volume_id")
        staging = required(req.staging_target_path, "staging_target_path")
        target = required(req.target_path, "target_path")
        cap = _capability(req.volume_capability, req.HasField("volume_capability"))
        block = cap.HasField("block")
        source = os.path.join(staging, mounts.BLOCK_FILE) if block else staging
        async with self._volumes[volume_id]:
            staged = self._staged_disk(staging)
            if staged is None:
                raise CsiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"volume {volume_id} is not staged at {staging}",
                )
            existing = self._disk_at(target)
            if existing is not None:
                if existing.name != staged.name:
                    raise CsiError(grpc.StatusCode.ALREADY_EXISTS, f"{target} holds another volume")
                return pb.NodePublishVolumeResponse()
            if block:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "a").close()
                if req.readonly:  # a read-only mount does not stop writes to a device node
                    source = await mounts.read_only_loop(staged.path)
            else:
                os.makedirs(target, exist_ok=True)
            await mounts.bind(source, target, req.readonly)
        return pb.NodePublishVolumeResponse()

    async def NodeUnpublishVolume(
        self, req: pb.NodeUnpublishVolumeRequest, ctx: Any
    ) -> pb.NodeUnpublishVolumeResponse:
        volume_id = required(req.volume_id, "volume_id")
        target = required(req.target_path, "target_path")
        async with self._volumes[volume_id]:
            loop = None
            if mounts.mount_at(target) is not None and not os.path.isdir(target):
                loop = mounts.loop_device(os.stat(target).st_rdev)
            await mounts.umount(target)
            if loop is not None:
                await mounts.detach_loop(loop)
            if os.path.isdir(target):
                os.rmdir(target)
            elif os.path.exists(target):
                os.unlink(target)
        return pb.NodeUnpublishVolumeResponse()

    # --- stats and expansion --------------------------------------------------------------

    def _condition(self, disk: Disk, path: str) -> pb.VolumeCondition:
        problems = []
        session_state = self.initiator.session_state(disk.session)
        if session_state and session_state != "LOGGED_IN":
            problems.append(f"iSCSI session {session_state.lower()} (reconnecting through the VIP)")
        disk_state = self.initiator.disk_state(disk)
        if disk_state and disk_state != "running":
            problems.append(f"disk {disk.name} {disk_state}")
        m = mounts.mount_at(path)
        if m is not None and m.fs_type != "devtmpfs":
            if "ro" in m.super_options and "rw" in m.options:
                problems.append("file system remounted read-only after errors")
            errors = self.initiator._read(f"/sys/fs/ext4/{disk.name}/errors_count")
            if errors and errors != "0":
                problems.append(f"{errors} ext4 errors")
        if problems:
            return pb.VolumeCondition(abnormal=True, message="; ".join(problems))
        return pb.VolumeCondition(abnormal=False, message="ok")

    async def NodeGetVolumeStats(
        self, req: pb.NodeGetVolumeStatsRequest, ctx: Any
    ) -> pb.NodeGetVolumeStatsResponse:
        required(req.volume_id, "volume_id")
        path = required(req.volume_path, "volume_path")
        if not os.path.exists(path):
            raise not_found(f"{path} does not exist")
        disk = self._disk_at(path)
        if disk is None:
            raise not_found(f"no lunastor volume is published at {path}")
        Unit = pb.VolumeUsage.Unit
        if os.path.isdir(path):
            st = os.statvfs(path)
            usage = [
                pb.VolumeUsage(
                    unit=Unit.BYTES,
                    total=st.f_blocks * st.f_frsize,
                    available=st.f_bavail * st.f_frsize,
                    used=(st.f_blocks - st.f_bfree) * st.f_frsize,
                ),
                pb.VolumeUsage(
                    unit=Unit.INODES,
                    total=st.f_files,
                    available=st.f_favail,
                    used=st.f_files - st.f_ffree,
                ),
            ]
        else:
            usage = [pb.VolumeUsage(unit=Unit.BYTES, total=self.initiator.disk_bytes(disk))]
        return pb.NodeGetVolumeStatsResponse(
            usage=usage, volume_condition=self._condition(disk, path)
        )

    async def NodeExpandVolume(
        self, req: pb.NodeExpandVolumeRequest, ctx: Any
    ) -> pb.NodeExpandVolumeResponse:
        volume_id = required(req.volume_id, "volume_id")
        path = required(req.volume_path, "volume_path")
        if not os.path.exists(path):
            raise not_found(f"{path} does not exist")
        disk = self._disk_at(path)
        if disk is None:
            raise not_found(f"volume {volume_id} is not published at {path}")
        wanted = req.capacity_range.required_bytes if req.HasField("capacity_range") else 0
        async with self._volumes[volume_id]:
            await self.initiator.rescan_disk(disk)
            size = self.initiator.disk_bytes(disk)
            if wanted and size < wanted:
                raise CsiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{disk.path} is {size} bytes after a rescan, {wanted} asked: "
                    "ControllerExpandVolume first",
                )
            m = mounts.mount_at(path)
            if m is not None and os.path.isdir(path):
                await mounts.grow(disk.path, path, m.fs_type)
        return pb.NodeExpandVolumeResponse(capacity_bytes=size)

    # --- info -----------------------------------------------------------------------------

    async def NodeGetCapabilities(self, req: Any, ctx: Any) -> pb.NodeGetCapabilitiesResponse:
        return pb.NodeGetCapabilitiesResponse(
            capabilities=[pb.NodeServiceCapability(rpc=RPC(type=t)) for t in CAPABILITIES]
        )

    async def NodeGetInfo(self, req: Any, ctx: Any) -> pb.NodeGetInfoResponse:
        return pb.NodeGetInfoResponse(
            node_id=self.node_id,
            max_volumes_per_node=self.config.max_volumes,
            accessible_topology=pb.Topology(segments={ZONE_KEY: self.config.zone}),
        )
