"""The node's open-iscsi, seen through iscsiadm and sysfs. Nothing is remembered in memory:
sessions, LUNs and disks are read from /sys each time, so a restarted plugin knows exactly
what the node has (kernel sessions outlive the plugin; that is the point)."""

from __future__ import annotations

import asyncio
import glob
import os
import re
import time
from dataclasses import dataclass

import grpc

from lunastor.csi import host
from lunastor.csi.config import IscsiSettings
from lunastor.csi.errors import CsiError

#: a SCSI disk of an iSCSI session: .../sessionS/targetH:C:T/H:C:T:L/block/NAME
_DISK_PATH = re.compile(r"/session(\d+)/target[^/]+/\d+:\d+:\d+:(\d+)/block/([^/]+)$")
ALREADY_LOGGED_IN = 15  # iscsiadm: "session exists"
NO_SESSION = 21  # iscsiadm: no matching sessions / records
LOGIN_AUTH_FAILED = 24  # iscsiadm: the target refused our CHAP (or its absence)


@dataclass(frozen=True)
class Disk:
    name: str  # sdX
    session: int
    lun: int

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"


class Initiator:
    def __init__(self, settings: IscsiSettings, sysfs: str = "/sys") -> None:
        self.settings = settings
        self.sysfs = sysfs

    def _iscsiadm(self, *args: str) -> list[str]:
        return [self.settings.iscsiadm, *args]

    def initiator_name(self) -> str:
        try:
            with open(self.settings.initiator_name_file) as f:
                for line in f:
                    key, _, value = line.strip().partition("=")
                    if key == "InitiatorName" and value:
                        return value.strip()
        except OSError as exc:
            raise CsiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self.settings.initiator_name_file}: {exc} (is open-iscsi installed?)",
            ) from None
        raise CsiError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{self.settings.initiator_name_file}: no InitiatorName=",
        )

    # --- sysfs ------------------------------------------------------------------------------

    def _read(self, path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ""

    def session_of(self, target_iqn: str) -> int | None:
        """The session logged in to `target_iqn` (one per target on a node), or None."""
        for path in glob.glob(f"{self.sysfs}/class/iscsi_session/session*"):
            if self._read(f"{path}/targetname") == target_iqn:
                return int(os.path.basename(path).removeprefix("session"))
        return None

    def session_state(self, session: int) -> str:
        return self._read(f"{self.sysfs}/class/iscsi_session/session{session}/state")

    def target_of(self, session: int) -> str:
        return self._read(f"{self.sysfs}/class/iscsi_session/session{session}/targetname")

    def disks(self, session: int) -> list[Disk]:
        base = os.path.realpath(f"{self.sysfs}/class/iscsi_session/session{session}/device")
        out = []
        for path in sorted(glob.glob(f"{base}/target*/*:*:*:*/block/*")):
            m = _DISK_PATH.search(path)
            if m:
                out.append(Disk(m.group(3), int(m.group(1)), int(m.group(2))))
        return out

    def devno(self, disk: Disk) -> int | None:
        try:
            return os.stat(disk.path).st_rdev
        except OSError:
            return None

    def disk_by_devno(self, devno: int) -> Disk | None:
        """The iSCSI disk with device number `devno` (st_dev / st_rdev), if it is one."""
        path = os.path.realpath(f"{self.sysfs}/dev/block/{os.major(devno)}:{os.minor(devno)}")
        m = _DISK_PATH.search(path)
        return Disk(m.group(3), int(m.group(1)), int(m.group(2))) if m else None

    def disk_state(self, disk: Disk) -> str:
        return self._read(f"{self.sysfs}/class/block/{disk.name}/device/state")

    def disk_bytes(self, disk: Disk) -> int:
        sectors = self._read(f"{self.sysfs}/class/block/{disk.name}/size")
        return int(sectors) * 512 if sectors else 0

    # --- sessions ---------------------------------------------------------------------------

    async def _update(self, iqn: str, portal: str, settings: dict[str, str]) -> None:
        for name, value in settings.items():
            await host.run(
                self._iscsiadm(
                    "-m", "node", "-T", iqn, "-p", portal, "-o", "update", "-n", name, "-v", value
                )
            )

    async def login(self, portal: str, iqn: str, chap: dict[str, str]) -> int:
        """A session to `iqn` through the VIP `portal`: a fresh node record (SendTargets
        discovery there), its timers and CHAP set, then login. An existing session is kept
        and rescanned, so a LUN published since it logged in appears."""
        session = self.session_of(iqn)
        if session is not None:
            await self.rescan(session)
            return session
        s = self.settings
        # a record left by an earlier login may carry other CHAP settings: start afresh
        await host.run(self._iscsiadm("-m", "node", "-T", iqn, "-o", "delete"), ok=(0, NO_SESSION))
        await host.run(
            self._iscsiadm("-m", "discovery", "-t", "sendtargets", "-p", portal), timeout=60
        )
        # the record may not be listed (discovery lists what the ACLs show): make sure it is
        await host.run(
            self._iscsiadm("-m", "node", "-T", iqn, "-p", portal, "-o", "new"), ok=(0, 6, 15)
        )
        settings = {
            "node.startup": "manual",  # the plugin logs in; a node reboot must not race it
            "node.session.timeo.replacement_timeout": str(s.replacement_timeout),
            "node.conn[0].timeo.noop_out_interval": str(s.noop_out_interval),
            "node.conn[0].timeo.noop_out_timeout": str(s.noop_out_timeout),
            "node.conn[0].timeo.login_timeout": str(s.login_timeout),
            "node.session.iscsi.DefaultTime2Wait": str(s.default_time2wait),
        }
        if chap:  # without, the fresh record has iscsid.conf's authmethod (None); iscsiadm
            # 2.1.8 crashes when asked to update authmethod to None
            settings["node.session.auth.authmethod"] = "CHAP"
            settings.update(chap)
        await self._update(iqn, portal, settings)
        result = await host.run(
            self._iscsiadm("-m", "node", "-T", iqn, "-p", portal, "--login"),
            timeout=s.login_timeout * 4 + 10,
            ok=(0, ALREADY_LOGGED_IN, LOGIN_AUTH_FAILED),
        )
        if result.returncode == LOGIN_AUTH_FAILED:
            raise result.error(grpc.StatusCode.PERMISSION_DENIED)
        session = self.session_of(iqn)
        if session is None:
            raise CsiError(grpc.StatusCode.INTERNAL, f"logged in to {iqn} but no session in sysfs")
        return session

    async def rescan(self, session: int) -> None:
        await host.run(self._iscsiadm("-m", "session", "-r", str(session), "--rescan"))

    async def wait_disk(self, iqn: str, session: int, lun: int) -> Disk:
        """The disk of LUN `lun` once the kernel has it (rescanning now and then: a LUN
        published after the login appears only after a REPORT LUNS)."""
        deadline = time.monotonic() + self.settings.device_timeout
        next_rescan = time.monotonic() + 3
        while True:
            for disk in self.disks(session):
                if disk.lun == lun and os.path.exists(disk.path):
                    return disk
            if time.monotonic() > deadline:
                raise CsiError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"LUN {lun} of {iqn} did not appear in {self.settings.device_timeout:.0f}s "
                    "(is the volume published to this node?)",
                )
            if time.monotonic() > next_rescan:
                await self.rescan(session)
                next_rescan = time.monotonic() + 3
            await asyncio.sleep(0.2)

    async def remove_disk(self, disk: Disk) -> None:
        """Flush and detach one LUN's disk; the session stays for the target's other LUNs."""
        if os.path.exists(disk.path):
            await host.run(["blockdev", "--flushbufs", disk.path], ok=(0, 1))
        path = f"{self.sysfs}/class/block/{disk.name}/device/delete"
        if os.path.exists(path):
            with open(path, "w") as f:
                f.write("1")

    async def rescan_disk(self, disk: Disk) -> None:
        """Read the capacity again (after an online expansion)."""
        with open(f"{self.sysfs}/class/block/{disk.name}/device/rescan", "w") as f:
            f.write("1")

    async def logout(self, session: int) -> None:
        iqn = self.target_of(session)
        await host.run(
            self._iscsiadm("-m", "session", "-r", str(session), "--logout"), ok=(0, NO_SESSION)
        )
        if iqn:
            await host.run(
                self._iscsiadm("-m", "node", "-T", iqn, "-o", "delete"), ok=(0, NO_SESSION)
            )
