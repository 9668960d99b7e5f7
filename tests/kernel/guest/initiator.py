"""Guest side: the kernel iSCSI initiator (open-iscsi's iscsid and iscsiadm) as step helpers.

Standard library only; used by the scenario programs in this directory.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Collection

from steps import Run, StepFailed, wait_for

ISCSIADM_SOCKET = "@ISCSIADM_ABSTRACT_NAMESPACE"  # where iscsid listens for iscsiadm
ISCSI_ERR_LOGIN_AUTH_FAILED = 24  # iscsiadm's exit code when the target refuses our CHAP


def start_iscsid(run: Run, initiator: str) -> None:
    """Name the initiator and start iscsid; ready once its control socket exists."""
    # the host's /etc/iscsi shows through the overlay: replace its config, forget its records
    for records in ("nodes", "send_targets", "ifaces"):
        shutil.rmtree(f"/etc/iscsi/{records}", ignore_errors=True)
    os.makedirs("/etc/iscsi", exist_ok=True)
    shutil.copyfile(
        os.path.join(os.path.dirname(__file__), "iscsid.conf"), "/etc/iscsi/iscsid.conf"
    )
    with open("/etc/iscsi/initiatorname.iscsi", "w") as f:
        f.write(f"InitiatorName={initiator}\n")
    for module in ("iscsi_tcp", "sd_mod", "sg"):
        run.sh("modprobe", module)
    # udevd makes /dev/disk/by-path, the name every real user of the initiator looks disks up by
    run.sh("/lib/systemd/systemd-udevd", "--daemon")
    run.sh("iscsid")

    def listening() -> bool:
        with open("/proc/net/unix") as f:
            return any(line.rstrip().endswith(ISCSIADM_SOCKET) for line in f)

    wait_for(listening, 30, "iscsid's control socket")


def iscsiadm(run: Run, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run.sh("iscsiadm", *args, check=check)


def node_update(run: Run, iqn: str, portal: str, settings: dict[str, str]) -> None:
    for name, value in settings.items():
        iscsiadm(
            run, "-m", "node", "-T", iqn, "-p", portal, "-o", "update", "-n", name, "-v", value
        )


def discover(run: Run, portal: str, auth: dict[str, str] | None = None) -> list[str]:
    """SendTargets discovery; returns the target names found. `auth`: discovery CHAP settings."""
    if auth is None:
        out = iscsiadm(run, "-m", "discovery", "-t", "sendtargets", "-p", portal).stdout
    else:
        base = ["-m", "discoverydb", "-t", "sendtargets", "-p", portal]
        iscsiadm(run, *base, "-o", "new")
        for name, value in auth.items():
            iscsiadm(run, *base, "-o", "update", "-n", name, "-v", value)
        out = iscsiadm(run, *base, "--discover").stdout
    # lines look like "192.168.77.1:3260,1 iqn.2025-01.example:disk"
    return [line.split()[1] for line in out.splitlines() if len(line.split()) == 2]


def by_path(portal: str, iqn: str, lun: int) -> str:
    host, _, port = portal.partition(":")
    return f"/dev/disk/by-path/ip-{host}:{port or 3260}-iscsi-{iqn}-lun-{lun}"


def login(run: Run, iqn: str, portal: str, lun: int = 0) -> str:
    """Log in and wait for the LUN's disk; returns its /dev/sdX."""
    iscsiadm(run, "-m", "node", "-T", iqn, "-p", portal, "--login")
    link = by_path(portal, iqn, lun)
    wait_for(lambda: os.path.exists(link), 30, link)
    disk = os.path.realpath(link)
    run.message(f"{link} -> {disk}")
    return disk


def logout(run: Run, iqn: str, portal: str) -> None:
    iscsiadm(run, "-m", "node", "-T", iqn, "-p", portal, "--logout")
    wait_for(lambda: not sessions_for(iqn), 30, f"the session to {iqn} to end")


def sessions_for(iqn: str) -> list[str]:
    found = []
    for path in glob.glob("/sys/class/iscsi_session/session*/targetname"):
        with open(path) as f:
            if f.read().strip() == iqn:
                found.append(os.path.dirname(path))
    return found


def expect_refused(proc: subprocess.CompletedProcess[str], what: str, code: int | None) -> None:
    """Fail the step unless `proc` failed (with `code`, when given)."""
    if proc.returncode == 0:
        raise StepFailed(f"{what} succeeded; the target should have refused it")
    if code is not None and proc.returncode != code:
        raise StepFailed(f"{what} exited {proc.returncode}, expected {code}")


def session_disk(iqn: str, lun: int, exclude: Collection[str] = ()) -> str | None:
    """The /dev/sdX of LUN `lun` of a session to `iqn` (not one of `exclude`: the disks of
    the sessions logged in before), once the kernel made it.

    Found through sysfs, which names the session's disks whichever portal it ended up on (a
    redirected login's by-path link is not guaranteed to name the portal the user gave)."""
    for session in sessions_for(iqn):
        for block in glob.glob(f"{session}/device/target*/*:*:*:{lun}/block/*"):
            disk = f"/dev/{os.path.basename(block)}"
            if disk not in exclude:
                return disk
    return None


def current_portal(iqn: str) -> str:
    """address:port of the connection the session to `iqn` runs on now (after redirects)."""
    for session in sessions_for(iqn):
        for conn in glob.glob(f"{session}/device/connection*/iscsi_connection/connection*"):
            with open(f"{conn}/address") as f:
                address = f.read().strip()
            with open(f"{conn}/port") as f:
                port = f.read().strip()
            return f"{address}:{port}"
    return ""


def new_iface(run: Run, name: str, initiator_name: str) -> list[str]:
    """An iface carrying another initiator name (a second node); returns `-I name`."""
    iscsiadm(run, "-m", "iface", "-I", name, "-o", "new")
    iscsiadm(
        run, "-m", "iface", "-I", name, "-o", "update", "-n", "iface.initiatorname",
        "-v", initiator_name,
    )  # fmt: skip
    return ["-I", name]


def login_disk(
    run: Run,
    iqn: str,
    portal: str,
    lun: int,
    iface: list[str],
    settings: dict[str, str],
    exclude: Collection[str] = (),
) -> str:
    """Discover through `portal`, apply node `settings`, log in, wait for the LUN's disk (a
    disk not in `exclude`: another session to the same target already has those)."""
    out = iscsiadm(run, "-m", "discovery", "-t", "sendtargets", "-p", portal, *iface).stdout
    if iqn not in out:
        raise StepFailed(f"SendTargets at {portal} did not list {iqn}: {out.strip()}")
    node = ["-m", "node", "-T", iqn, "-p", portal, *iface]
    for name, value in settings.items():
        iscsiadm(run, *node, "-o", "update", "-n", name, "-v", value)
    iscsiadm(run, *node, "--login")
    disk: str = wait_for(lambda: session_disk(iqn, lun, exclude), 30, f"LUN {lun} of {iqn}")
    wait_for(lambda: os.path.exists(disk), 30, disk)
    run.message(f"{iqn} lun {lun}: {disk}, connected to {current_portal(iqn)}")
    return disk


def logout_iface(run: Run, iqn: str, portal: str, iface: list[str]) -> None:
    iscsiadm(run, "-m", "node", "-T", iqn, "-p", portal, *iface, "--logout")
    wait_for(lambda: not sessions_for(iqn), 30, f"the session to {iqn} to end")
