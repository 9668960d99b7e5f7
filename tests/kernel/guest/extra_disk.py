#!/usr/bin/python3
"""Guest scenario (harness self-test): the extra virtio disk the host attached is usable.

Reads the host's marker at offset 0, checks the size, writes the guest's marker at 4096.

params.json: size, host_marker, guest_marker.
"""

from __future__ import annotations

import os

from steps import Run, StepFailed, main, wait_for

DISK = "/dev/vda"


def body(run: Run) -> None:
    p = run.params
    with run.step("virtio-blk"):
        run.sh("modprobe", "virtio_blk")
        wait_for(lambda: os.path.exists(DISK), 30, DISK)
        with open("/sys/block/vda/size") as f:
            size = int(f.read()) * 512
        if size != p["size"]:
            raise StepFailed(f"{DISK} has {size} bytes, the host made {p['size']}")
    with run.step("read-host-marker"):
        with open(DISK, "rb") as f:
            found = f.read(len(p["host_marker"]))
        if found != p["host_marker"].encode():
            raise StepFailed(f"read {found!r} at offset 0")
    with run.step("write-guest-marker"):
        fd = os.open(DISK, os.O_WRONLY)
        try:
            os.pwrite(fd, p["guest_marker"].encode(), 4096)
            os.fsync(fd)
        finally:
            os.close(fd)


main("extra-disk", body)
