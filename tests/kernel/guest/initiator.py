"""Guest side: the kernel iSCSI initiator (open-iscsi's iscsid and iscsiadm) as step helpers.

Standard library only; used by the scenario programs in this directory.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

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
