#!/usr/bin/python3
"""Guest scenario: the target restarts under load; the kernel initiator recovers, no data lost.

Writes a pattern with direct I/O, starts fio (4k random writes with verification) on another
part of the disk, asks the host to restart the target while fio runs, and requires fio to
finish without an error and the pattern to read back intact (direct I/O, so from the target).

params.json: portal, iqn, initiator, lun, fio_seconds, pattern_mib.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time

import initiator
from steps import Run, StepFailed, console, main, wait_for

PATTERN = "/tmp/pattern.bin"


def writes_done(disk: str) -> int:
    """Write requests the block layer has completed on `disk` (/sys/block/X/stat field 5)."""
    with open(f"/sys/block/{os.path.basename(disk)}/stat") as f:
        return int(f.read().split()[4])


def direct_sha256(run: Run, disk: str, mib: int) -> str:
    out = run.sh(
        "sh", "-c", f"dd if={disk} bs=1M count={mib} iflag=direct status=none | sha256sum"
    ).stdout
    return out.split()[0]


def body(run: Run) -> None:
    p = run.params
    portal, iqn, mib = p["portal"], p["iqn"], p["pattern_mib"]
    with run.step("iscsid"):
        initiator.start_iscsid(run, p["initiator"])
    with run.step("discovery-login"):
        initiator.discover(run, portal)
        disk = initiator.login(run, iqn, portal, p["lun"])
    with run.step("write-pattern"):
        data = os.urandom(mib << 20)
        with open(PATTERN, "wb") as f:
            f.write(data)
        run.sh("dd", f"if={PATTERN}", f"of={disk}", "bs=1M", "oflag=direct", "conv=fsync")
        digest = hashlib.sha256(data).hexdigest()
        run.record("pattern_sha256", digest)
    with run.step("fio-start"):
        fio = subprocess.Popen(
            [
                "fio",
                "--name=across-restart",
                f"--filename={disk}",
                "--ioengine=libaio",
                "--direct=1",
                "--iodepth=8",
                "--rw=randwrite",
                "--bs=4k",
                f"--offset={mib}M",
                "--size=64M",
                "--time_based",
                f"--runtime={p['fio_seconds']}",
                "--verify=crc32c",
                "--verify_backlog=128",
                "--verify_fatal=1",
                "--output-format=json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        before = writes_done(disk)
        wait_for(lambda: writes_done(disk) > before + 100, 60, "fio to be writing")
    with run.step("restart-target"):
        asked = time.monotonic()
        run.ask_host("restart-target", 90)
        answered = writes_done(disk)
        # the initiator notices the dropped connection, reconnects, logs in again and resends
        wait_for(lambda: writes_done(disk) > answered + 100, 150, "writes to resume")
        resumed = round(time.monotonic() - asked, 2)
        run.record("io_resumed_after_seconds", resumed)
        run.message(f"writes resumed {resumed}s after asking for the restart")
    with run.step("fio-finish"):
        try:
            out, _ = fio.communicate(timeout=p["fio_seconds"] + 180)
        except subprocess.TimeoutExpired:
            fio.kill()
            raise StepFailed("fio did not finish") from None
        console(out[-1500:])
        try:
            job = json.loads(out[out.index("{") :])["jobs"][0]
        except (ValueError, KeyError, IndexError) as exc:
            raise StepFailed(f"fio exited {fio.returncode}, no JSON report: {exc}") from None
        summary = {
            "error": job["error"],
            "write_ios": job["write"]["total_ios"],
            "verify_read_ios": job["read"]["total_ios"],
            "write_max_lat_ms": round(job["write"]["lat_ns"]["max"] / 1e6, 1),
        }
        run.record("fio", summary)
        if fio.returncode != 0 or job["error"] != 0:
            raise StepFailed(f"fio exited {fio.returncode} across the restart: {summary}")
    with run.step("verify-pattern"):
        found = direct_sha256(run, disk, mib)
        if found != digest:
            raise StepFailed(f"pattern sha256 {found} after the restart, wrote {digest}")
    with run.step("logout"):
        initiator.logout(run, iqn, portal)


main("iscsi-restart", body)
