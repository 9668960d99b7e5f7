#!/usr/bin/python3
"""Guest scenarios 4 and 5 of issue 8, against the dev cluster, in one boot.

- snapshot-clone: ext4 on a volume, files written with fsync, `fsfreeze -f`, the host takes a
  snapshot through the REST API and makes a clone volume of it, `fsfreeze -u`; the original
  then changes (a new file, an overwritten one). The clone, logged in and mounted next to the
  original, must hold exactly the files as they were at the snapshot.
- pr-two-sessions: two initiator names whose sessions the redirector sends to two different
  chunk servers; SCSI persistent reservations (sg_persist) made through one session must be
  seen and enforced through the other: registrations, WRITE EXCLUSIVE held by A (B's writes
  get RESERVATION CONFLICT), B preempts A, then clears.

params.json: portal, route, host, node, snap_iqn, snap_lun, files, pr_iqn, pr_lun, pr_a, pr_b.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

import initiator
from steps import Run, StepFailed, main, wait_for

SRC, CLONE = "/mnt/src", "/mnt/clone"


def write_file(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def snapshot_clone(run: Run) -> None:
    p = run.params
    run.part = "snapshot-clone"
    iqn, lun, portal = p["snap_iqn"], p["snap_lun"], p["portal"]
    with run.step("login-mkfs"):
        disk = initiator.login_disk(run, iqn, portal, lun, [], {})
        run.sh("mkfs.ext4", "-q", "-F", disk, timeout=300)
        os.makedirs(SRC, exist_ok=True)
        run.sh("mount", disk, SRC)
    with run.step("write-files"):
        digests = {
            name: write_file(os.path.join(SRC, name), os.urandom(size))
            for name, size in p["files"].items()
        }
    with run.step("fsfreeze-snapshot"):
        run.sh("fsfreeze", "-f", SRC)
        try:
            clone = json.loads(run.ask_host("snapshot", 120))
        finally:
            run.sh("fsfreeze", "-u", SRC)
    with run.step("change-original"):
        write_file(os.path.join(SRC, "after-snapshot.bin"), os.urandom(65536))
        first = next(iter(p["files"]))
        write_file(os.path.join(SRC, first), os.urandom(p["files"][first]))
    with run.step("clone-login-mount"):
        if clone["iqn"] == iqn:  # a new LUN on the target we are logged in to
            initiator.iscsiadm(run, "-m", "session", "-R")
            clone_disk = wait_for(
                lambda: initiator.session_disk(iqn, clone["lun"]), 60, "the clone's LUN"
            )
        else:
            clone_disk = initiator.login_disk(run, clone["iqn"], portal, clone["lun"], [], {})
        os.makedirs(CLONE, exist_ok=True)
        run.sh("mount", "-o", "ro", clone_disk, CLONE)
    with run.step("clone-verify"):
        found = {name: sha256_of(os.path.join(CLONE, name)) for name in p["files"]}
        bad = [name for name in p["files"] if found[name] != digests[name]]
        if bad:
            raise StepFailed(f"the clone differs from the snapshot in {bad}")
        if os.path.exists(os.path.join(CLONE, "after-snapshot.bin")):
            raise StepFailed("the clone holds a file written after the snapshot")
    with run.step("umount-logout"):
        run.sh("umount", CLONE)
        run.sh("umount", SRC)
        initiator.iscsiadm(run, "-m", "node", "--logoutall=all")


def sg_persist(run: Run, disk: str, *args: str, check: bool = True) -> str:
    return run.sh("sg_persist", "--no-inquiry", *args, disk, check=check).stdout


def sg_persist_preempted(run: Run, disk: str, *args: str) -> str:
    """sg_persist from a session whose registration another session just preempted. Its
    first command may meet the unit attention REGISTRATIONS PREEMPTED that the PREEMPT
    established for it (SPC-4, PREEMPT service action), depending on whether the news
    reached its access point before or after that command: sg_persist reports the unit
    attention (exit 6) rather than retrying, so this retries once, after checking that it
    is that one."""
    proc = run.sh("sg_persist", "--no-inquiry", *args, disk, check=False)
    if proc.returncode == 6:
        output = proc.stdout + proc.stderr
        if "Registrations preempted" not in output:
            raise StepFailed(f"an unexpected unit attention: {output.strip()[-300:]}")
        proc = run.sh("sg_persist", "--no-inquiry", *args, disk)
    elif proc.returncode != 0:
        raise StepFailed(f"sg_persist exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def dd_write(run: Run, disk: str) -> int:
    """A 4 KiB direct write at offset 0; its exit status."""
    return run.sh(
        "dd", "if=/dev/zero", f"of={disk}", "bs=4096", "count=1", "oflag=direct", check=False
    ).returncode


def pr_two_sessions(run: Run) -> None:
    p = run.params
    run.part = "pr-two-sessions"
    iqn, lun, portal = p["pr_iqn"], p["pr_lun"], p["portal"]
    with run.step("two-sessions"):
        disks: list[str] = []
        portals: list[str] = []
        for name in ("pr_a", "pr_b"):
            iface = initiator.new_iface(run, name.replace("_", "-"), p[name])
            disks.append(initiator.login_disk(run, iqn, portal, lun, iface, {}, disks))
            portals.append(initiator_portal(iqn, len(portals)))
        run.record("pr_portals", portals)
        if portals[0] == portals[1]:
            raise StepFailed(f"both sessions landed on {portals[0]}")
    a, b = disks
    with run.step("register"):
        sg_persist(run, a, "--out", "--register", "--param-sark=0xa1")
        sg_persist(run, b, "--out", "--register", "--param-sark=0xb2")
        keys = sg_persist(run, b, "--in", "--read-keys")
        if "0xa1" not in keys or "0xb2" not in keys:
            raise StepFailed(f"B does not see both registrations: {keys.strip()}")
    with run.step("reserve-a"):
        sg_persist(run, a, "--out", "--reserve", "--param-rk=0xa1", "--prout-type=1")
        seen = sg_persist(run, b, "--in", "--read-reservation")
        if "0xa1" not in seen:
            raise StepFailed(f"B does not see A's reservation: {seen.strip()}")
        if dd_write(run, b) == 0:
            raise StepFailed("B wrote through A's WRITE EXCLUSIVE reservation")
        if dd_write(run, a) != 0:
            raise StepFailed("the holder A could not write")
    with run.step("preempt-b"):
        sg_persist(
            run, b, "--out", "--preempt", "--param-rk=0xb2", "--param-sark=0xa1",
            "--prout-type=1",
        )  # fmt: skip
        seen = sg_persist_preempted(run, a, "--in", "--read-reservation")
        if "0xb2" not in seen:
            raise StepFailed(f"A does not see B's reservation after the preempt: {seen.strip()}")
        if dd_write(run, a) == 0:
            raise StepFailed("A wrote after B preempted it")
        if dd_write(run, b) != 0:
            raise StepFailed("the new holder B could not write")
    with run.step("clear-logout"):
        sg_persist(run, b, "--out", "--clear", "--param-rk=0xb2")
        initiator.iscsiadm(run, "-m", "node", "--logoutall=all")


def initiator_portal(iqn: str, index: int) -> str:
    """The address of the `index`th session to `iqn` (sessions in sysfs order)."""
    sessions = sorted(initiator.sessions_for(iqn))
    if index >= len(sessions):
        return ""
    for conn in glob.glob(f"{sessions[index]}/device/connection*/iscsi_connection/connection*"):
        with open(f"{conn}/address") as f:
            return f.read().strip()
    return ""


def body(run: Run) -> None:
    p = run.params
    run.part = "snapshot-clone"
    with run.step("iscsid"):
        run.sh("ip", "route", "add", p["route"], "via", p["host"])
        initiator.start_iscsid(run, p["node"])
    failures = []
    for part in (snapshot_clone, pr_two_sessions):
        try:
            part(run)
        except StepFailed as exc:  # the other scenario still runs
            failures.append(str(exc))
            run.message(f"FAILED {exc}")
            initiator.iscsiadm(run, "-m", "node", "--logoutall=all", check=False)
    if failures:
        raise StepFailed("; ".join(failures))


main("features", body)
