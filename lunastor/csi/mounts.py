"""Mounts, file systems and devices of the node, read from /proc/self/mountinfo and stat().
The node plugin keeps no state of its own: what is staged and published is what is mounted."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from lunastor.csi import host

BLOCK_FILE = "device"  # a raw block volume's staging: its disk bind-mounted on this file


@dataclass(frozen=True)
class Mount:
    devno: int
    root: str
    point: str
    options: frozenset[str]
    fs_type: str
    source: str
    super_options: frozenset[str]


def _unescape(field: str) -> str:
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def parse_mountinfo(text: str) -> list[Mount]:
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f = left.split()
        r = right.split()
        if len(f) < 6 or len(r) < 3:
            continue
        major, _, minor = f[2].partition(":")
        out.append(
            Mount(
                devno=os.makedev(int(major), int(minor)),
                root=_unescape(f[3]),
                point=_unescape(f[4]),
                options=frozenset(f[5].split(",")),
                fs_type=r[0],
                source=_unescape(r[1]),
                super_options=frozenset(r[2].split(",")),
            )
        )
    return out


def mounts() -> list[Mount]:
    with open("/proc/self/mountinfo") as f:
        return parse_mountinfo(f.read())


def mount_at(path: str) -> Mount | None:
    """The topmost mount on `path`, or None."""
    path = os.path.realpath(path) if os.path.exists(path) else path
    found = None
    for m in mounts():
        if m.point == path:
            found = m
    return found


LOOP_MAJOR = 7


def backing(devno: int) -> int:
    """The disk under a loop device (a read-only raw block publish: a block device node's
    write permission ignores a read-only mount, so the pod gets a read-only loop device over
    the disk), else `devno` itself."""
    if os.major(devno) != LOOP_MAJOR:
        return devno
    try:
        with open(f"/sys/dev/block/{os.major(devno)}:{os.minor(devno)}/loop/backing_file") as f:
            st = os.stat(f.read().strip())
    except OSError:
        return devno
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else devno


def loop_device(devno: int) -> str | None:
    """/dev/loopN for a loop device number, else None."""
    if os.major(devno) != LOOP_MAJOR:
        return None
    return "/dev/" + os.path.basename(
        os.path.realpath(f"/sys/dev/block/{os.major(devno)}:{os.minor(devno)}")
    )


async def read_only_loop(device: str) -> str:
    if not os.path.exists("/dev/loop-control"):  # the loop driver is a module on some kernels
        await host.run(["modprobe", "loop"])
    result = await host.run(["losetup", "--read-only", "--find", "--show", device])
    return result.stdout.strip()


async def detach_loop(device: str) -> None:
    await host.run(["losetup", "-d", device], ok=(0, 1))


def device_of(path: str) -> int | None:
    """The block device behind `path`: the disk bind-mounted on a file, or the disk of the
    file system mounted there; None when nothing is mounted."""
    m = mount_at(path)
    if m is None:
        return None
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return backing(st.st_rdev)
    return st.st_dev


def devices_in_use() -> set[int]:
    """Device numbers of every disk something on this node has mounted or bind-mounted."""
    used = set()
    for m in mounts():
        used.add(m.devno)
        if m.fs_type == "devtmpfs" and m.root not in ("", "/"):
            try:
                st = os.stat(m.point)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode):
                used.add(backing(st.st_rdev))
    return used


async def mount(
    source: str, target: str, fs_type: str = "", options: list[str] | None = None
) -> None:
    argv = ["mount"]
    if fs_type:
        argv += ["-t", fs_type]
    if options:
        argv += ["-o", ",".join(options)]
    await host.run([*argv, source, target])


async def bind(source: str, target: str, read_only: bool) -> None:
    await host.run(["mount", "--bind", source, target])
    if read_only:
        await host.run(["mount", "-o", "remount,bind,ro", target])


async def umount(target: str) -> None:
    while mount_at(target) is not None:
        await host.run(["umount", target])


async def fs_type_on(device: str) -> str:
    """The file system (or other signature) on `device`; "" when it is blank."""
    result = await host.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device], ok=(0, 2))
    return result.stdout.strip() if result.returncode == 0 else ""


async def mkfs(device: str, fs_type: str) -> None:
    if fs_type == "xfs":
        # -K: no discard of the whole (thin, empty) device first
        await host.run(["mkfs.xfs", "-K", "-q", device], timeout=600)
    else:
        await host.run(
            ["mkfs.ext4", "-F", "-q", "-E", "nodiscard,lazy_itable_init=1", "-m", "0", device],
            timeout=600,
        )


async def grow(device: str, mount_point: str, fs_type: str) -> None:
    if fs_type == "xfs":
        await host.run(["xfs_growfs", mount_point], timeout=600)
    elif fs_type.startswith("ext"):
        await host.run(["resize2fs", device], timeout=600)
