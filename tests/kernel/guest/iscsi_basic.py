#!/usr/bin/python3
"""Guest scenario: the kernel initiator against one target, end to end.

Discovery, login, SCSI identity (sg_inq, sg_readcap, sg_vpd 0x83), fio 4k random writes with
verification on the raw disk, then a filesystem: mkfs.ext4, files written with fsync and their
sha256 recorded, logout, a second login, and the files read back and checked.

params.json: portal, iqn, initiator, lun, files ({name: bytes}), fio_seconds.
"""

from __future__ import annotations

import hashlib
import json
import os

import initiator
from steps import Run, StepFailed, main

MOUNT = "/mnt/lun"


def write_files(files: dict[str, int]) -> dict[str, str]:
    """Write random files with fsync each; return their sha256s."""
    digests = {}
    for name, size in files.items():
        data = os.urandom(size)
        with open(os.path.join(MOUNT, name), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        digests[name] = hashlib.sha256(data).hexdigest()
    dirfd = os.open(MOUNT, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    return digests


def read_digests(names: list[str]) -> dict[str, str]:
    digests = {}
    for name in names:
        h = hashlib.sha256()
        with open(os.path.join(MOUNT, name), "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digests[name] = h.hexdigest()
    return digests


def queue_limits(disk: str) -> dict[str, str]:
    """What the kernel made of the LUN's limits (block limits VPD, write cache, UNMAP)."""
    queue = f"/sys/block/{os.path.basename(disk)}/queue"
    limits = {}
    for name in (
        "logical_block_size",
        "physical_block_size",
        "max_hw_sectors_kb",
        "optimal_io_size",
        "discard_max_bytes",
        "write_cache",
        "fua",
        "rotational",
    ):
        try:
            with open(os.path.join(queue, name)) as f:
                limits[name] = f.read().strip()
        except OSError as exc:
            limits[name] = f"unreadable: {exc.strerror}"
    return limits


def fio_summary(report: dict) -> dict:
    job = report["jobs"][0]
    write, read = job["write"], job["read"]
    return {
        "error": job["error"],
        "write_iops": round(write["iops"]),
        "write_kib_s": write["bw"],
        "write_mean_lat_ms": round(write["lat_ns"]["mean"] / 1e6, 2),
        "verify_read_ios": read["total_ios"],
        "write_ios": write["total_ios"],
    }


def body(run: Run) -> None:
    p = run.params
    portal, iqn = p["portal"], p["iqn"]
    with run.step("iscsid"):
        initiator.start_iscsid(run, p["initiator"])
    with run.step("discovery"):
        found = initiator.discover(run, portal)
        if iqn not in found:
            raise StepFailed(f"SendTargets returned {found}, not {iqn}")
    with run.step("login"):
        disk = initiator.login(run, iqn, portal, p["lun"])
    with run.step("scsi-identity"):
        run.record("disk", disk)
        run.record("sg_inq", run.sh("sg_inq", disk).stdout)
        readcap = run.sh("sg_readcap", "--long", disk).stdout
        run.record("sg_readcap", readcap)
        run.record("sg_vpd_0x83", run.sh("sg_vpd", "--page=0x83", disk).stdout)
        run.record("session", run.sh("iscsiadm", "-m", "session", "-P", "3").stdout)
        run.record("queue", queue_limits(disk))
        expected = f"Device size: {p['size']} bytes"
        if expected not in readcap:
            raise StepFailed(f"sg_readcap does not say {expected!r}")
    with run.step("fio-randwrite-verify"):
        proc = run.sh(
            "fio",
            "--name=randwrite-verify",
            f"--filename={disk}",
            "--ioengine=libaio",
            "--direct=1",
            "--iodepth=8",
            "--rw=randwrite",
            "--bs=4k",
            "--size=64M",
            "--time_based",
            f"--runtime={p['fio_seconds']}",
            "--verify=crc32c",
            "--verify_backlog=128",  # verify while writing: a time-based job has no verify pass
            "--verify_fatal=1",
            "--output-format=json",
            check=False,
            timeout=p["fio_seconds"] + 120,
        )
        try:
            summary = fio_summary(json.loads(proc.stdout[proc.stdout.index("{") :]))
        except (ValueError, KeyError, IndexError) as exc:
            raise StepFailed(f"fio exited {proc.returncode}, no JSON report: {exc}") from None
        run.record("fio", summary)
        if proc.returncode != 0 or summary["error"] != 0:
            raise StepFailed(f"fio exited {proc.returncode}: {summary}")
        if summary["verify_read_ios"] == 0:
            raise StepFailed("fio verified nothing")
    with run.step("mkfs"):
        run.sh("mkfs.ext4", "-q", "-F", disk)
    with run.step("mount"):
        os.makedirs(MOUNT, exist_ok=True)
        run.sh("mount", disk, MOUNT)
    with run.step("write-files"):
        digests = write_files(p["files"])
        run.record("sha256", digests)
    with run.step("umount-logout"):
        run.sh("umount", MOUNT)
        initiator.logout(run, iqn, portal)
    with run.step("relogin"):
        disk = initiator.login(run, iqn, portal, p["lun"])
        run.sh("mount", disk, MOUNT)
    with run.step("verify-files"):
        again = read_digests(list(digests))
        bad = [name for name in digests if again[name] != digests[name]]
        if bad:
            raise StepFailed(f"sha256 differs after re-login for {bad}")
    with run.step("final-logout"):
        run.sh("umount", MOUNT)
        initiator.logout(run, iqn, portal)


main("iscsi-basic", body)
