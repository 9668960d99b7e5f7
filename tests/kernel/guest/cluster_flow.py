#!/usr/bin/python3
"""Guest scenarios against the dev cluster, in one boot (issue 8, scenarios 1, 2, 6 and 3).

Everything goes through the redirector's VIP, as a CSI node plugin would:

- node-flow: SendTargets discovery at the VIP, login (redirected to a chunk server), the disk
  appears, mkfs.ext4, mount, files written with fsync and their sha256 kept, unmount, logout.
  The host then moves the volume to a second node (REST: export to node2, unexport node1); an
  iface with node2's initiator name logs in, mounts and verifies the files. node1 is refused.
- expand: while a writer keeps writing files with fsync, the host grows the volume through the
  REST API; the kernel gets CAPACITY DATA HAS CHANGED, a rescan shows the new size,
  resize2fs grows the mounted file system, and the writer carries on.
- fstrim: a file is written and fsync'ed, the host measures what the chunk servers store, the
  file is deleted and `fstrim` run, and the host measures again (it waits for the space).
- failover: a workload writes and fsyncs files; the host SIGKILLs (or SIGSTOPs) the primary of
  the extent holding the ext4 journal, which every fsync writes (its session may be there
  too; then the initiator reconnects through the VIP within replacement_timeout) and the
  workload finishes. Reported: the longest gap between two fsync completions (goal: gap_goal;
  over gap_bound the step fails) and how many fsync'ed files read back wrong after a remount
  (must be 0).

params.json: portal (the VIP's), route (the cluster's /16, reached through the host), host,
iqn, lun, size, node1, node2, files, expand_to, fstrim_mib, node_settings (open-iscsi timers
of node2's session), replacement_timeout, failover_files_after, gap_goal (reported),
gap_bound (the step fails over it).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import subprocess
import threading
import time

import initiator
from steps import Run, StepFailed, main, wait_for

MOUNT = "/mnt/vol"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def mismatches(digests: dict[str, str]) -> list[str]:
    bad = []
    for path, digest in digests.items():
        try:
            found = sha256_of(path)
        except OSError as exc:
            found = f"unreadable: {exc}"
        if found != digest:
            bad.append(os.path.basename(path))
    return bad


class Writer(threading.Thread):
    """Writes files of `size` bytes with fsync, one after another, until stopped; records each
    file's sha256 and the moment its fsync returned."""

    def __init__(self, directory: str, size: int) -> None:
        super().__init__(daemon=True)
        self.directory = directory
        self.size = size
        self.digests: dict[str, str] = {}
        self.done: list[float] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()
        os.makedirs(directory, exist_ok=True)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                path = os.path.join(self.directory, f"f{len(self.done):05d}")
                self.digests[path] = write_file(path, os.urandom(self.size))
                self.done.append(time.monotonic())
                if len(self.done) % 8 == 0:
                    fsync_dir(self.directory)
            fsync_dir(self.directory)
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout: float) -> None:
        self.stop.set()
        self.join(timeout)
        if self.is_alive():
            raise StepFailed(f"the writer in {self.directory} did not stop within {timeout}s")
        if self.error is not None:
            raise StepFailed(f"the writer failed: {type(self.error).__name__}: {self.error}")

    def longest_gap(self, since: float) -> float:
        """The longest time between two fsync completions, counting from `since`."""
        times = [since] + [t for t in self.done if t > since]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def disk_bytes(disk: str) -> int:
    with open(f"/sys/block/{os.path.basename(disk)}/size") as f:
        return int(f.read()) * 512


def dmesg() -> str:
    return subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30).stdout


def node_flow(run: Run) -> tuple[str, list[str], dict[str, str]]:
    """Scenario 1; returns node2's disk, its iface and the files' digests."""
    p = run.params
    portal, iqn, lun = p["portal"], p["iqn"], p["lun"]
    run.part = "node-flow"
    with run.step("iscsid"):
        run.sh("ip", "route", "add", p["route"], "via", p["host"])
        initiator.start_iscsid(run, p["node1"])
    with run.step("discovery-login"):
        disk = initiator.login_disk(run, iqn, portal, lun, [], {})
        redirected = initiator.current_portal(iqn)
        run.record("node1_portal", redirected)
        if redirected.split(":")[0] == portal.split(":")[0]:
            raise StepFailed(f"the session runs on the VIP {redirected}, not a chunk server")
        if disk_bytes(disk) != p["size"]:
            raise StepFailed(f"{disk} has {disk_bytes(disk)} bytes, the volume {p['size']}")
    with run.step("mkfs-mount"):
        run.sh("mkfs.ext4", "-q", "-F", disk, timeout=300)
        os.makedirs(MOUNT, exist_ok=True)
        run.sh("mount", disk, MOUNT)
    with run.step("write-files"):
        digests = {
            os.path.join(MOUNT, name): write_file(os.path.join(MOUNT, name), os.urandom(size))
            for name, size in p["files"].items()
        }
        fsync_dir(MOUNT)
        run.record("sha256", {os.path.basename(k): v for k, v in digests.items()})
    with run.step("umount-logout"):
        run.sh("umount", MOUNT)
        initiator.logout(run, iqn, portal)
    with run.step("move-to-node2"):
        run.ask_host("publish-node2", 60)
        iface = initiator.new_iface(run, "node2", p["node2"])
    with run.step("node2-login"):
        # the ACL change reaches the redirector and chunk servers through etcd watches
        settings = dict(p["node_settings"])  # the failover's timers (cluster_scenarios.py)
        disk = wait_for(
            lambda: try_login(run, iqn, portal, lun, iface, settings), 30, "node2's login"
        )
        run.record("node2_portal", initiator.current_portal(iqn))
        run.sh("mount", disk, MOUNT)
    with run.step("node2-verify"):
        bad = mismatches(digests)
        if bad:
            raise StepFailed(f"node2 reads different bytes in {bad}")
    with run.step("node1-refused"):
        node = ["-m", "node", "-T", iqn, "-p", portal, "-I", "default"]
        proc = initiator.iscsiadm(run, *node, "--login", check=False)
        initiator.expect_refused(proc, "node1's login after the unpublish", None)
    return disk, iface, digests


def try_login(
    run: Run, iqn: str, portal: str, lun: int, iface: list[str], settings: dict[str, str]
) -> str | None:
    try:
        return initiator.login_disk(run, iqn, portal, lun, iface, settings)
    except StepFailed as exc:
        run.message(f"login not yet possible: {exc}")
        return None


def expand(run: Run, disk: str) -> None:
    """Scenario 2."""
    p = run.params
    run.part = "expand"
    writer = Writer(os.path.join(MOUNT, "expand"), 256 << 10)
    with run.step("writer-start"):
        writer.start()
        wait_for(lambda: len(writer.done) >= 4 or writer.error, 60, "the writer to write")
    with run.step("grow-volume"):
        run.ask_host("expand", 60)
    with run.step("unit-attention"):
        # the next command on the LUN gets CAPACITY DATA HAS CHANGED; the writer sends some
        seen = wait_for(
            lambda: re.search(r"capacity data has changed", dmesg(), re.I), 60, "the UA"
        )
        run.message(f"kernel: {seen.group(0)}")
    with run.step("rescan"):
        rescan = f"/sys/block/{os.path.basename(disk)}/device/rescan"
        with open(rescan, "w") as f:
            f.write("1\n")
        wait_for(lambda: disk_bytes(disk) == p["expand_to"], 30, f"{disk} to grow")
    with run.step("resize2fs"):
        before = os.statvfs(MOUNT)
        run.sh("resize2fs", disk, timeout=180)
        after = os.statvfs(MOUNT)
        grown = (after.f_blocks - before.f_blocks) * after.f_frsize
        run.record("fs_grown_bytes", grown)
        if grown < (p["expand_to"] - p["size"]) * 0.9:
            raise StepFailed(f"the file system grew by {grown} bytes only")
    with run.step("writer-continues"):
        mark = len(writer.done)
        wait_for(lambda: len(writer.done) >= mark + 4 or writer.error, 60, "writes after resize2fs")
        writer.finish(60)
        bad = mismatches(writer.digests)
        run.record("expand_files", len(writer.digests))
        if bad:
            raise StepFailed(f"{len(bad)} files written across the expansion read back wrong")


def fstrim(run: Run) -> None:
    """Scenario 6."""
    p = run.params
    run.part = "fstrim"
    path = os.path.join(MOUNT, "trim-me.bin")
    size = p["fstrim_mib"] << 20
    with run.step("write"), open(path, "wb") as f:
        for _ in range(p["fstrim_mib"]):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    with run.step("space-before"):
        run.record("used_before", int(run.ask_host("space-before", 120)))
    with run.step("delete-fstrim"):
        os.unlink(path)
        fsync_dir(MOUNT)
        run.sh("sync")
        out = run.sh("fstrim", "-v", MOUNT, timeout=300).stdout
        run.record("fstrim", out.strip())
    with run.step("space-after"):
        run.record("used_after", int(run.ask_host("space-after", 120, str(size))))


def failover(run: Run, disk: str, iface: list[str], digests: dict[str, str]) -> None:
    """Scenario 3."""
    p = run.params
    iqn = p["iqn"]
    run.part = "failover"
    writer = Writer(os.path.join(MOUNT, "failover"), 128 << 10)
    with run.step("workload-start"):
        before = initiator.current_portal(iqn)
        run.record("failover_portal_before", before)
        writer.start()
        wait_for(lambda: len(writer.done) >= 8 or writer.error, 60, "the workload to write")
        # every fsync commits to the journal: its extent's primary is the victim
        # (-c -n: the mounted file system's bitmaps on disk lag behind; they are not needed)
        block = run.sh("debugfs", "-c", "-n", "-R", "bmap <8> 0", disk).stdout.split()[-1]
        journal = int(block) * os.statvfs(MOUNT).f_bsize
        run.record("journal_offset", journal)
    with run.step("kill-chunk-server"):
        asked = time.monotonic()
        victim = run.ask_host("kill-chunk", 60, str(journal))
        run.message(f"host killed {victim}")
    with run.step("reconnect"):
        mark = len(writer.done)
        wait_for(
            lambda: len(writer.done) > mark or writer.error,
            p["replacement_timeout"] + 30,
            "an fsync to complete after the kill",
        )
        after = wait_for(lambda: initiator.current_portal(iqn), 30, "the new connection")
        run.record("failover_portal_after", after)
        run.message(f"session moved from {before} to {after}")
    with run.step("workload-finish"):
        mark = len(writer.done)
        wait_for(
            lambda: len(writer.done) >= mark + p["failover_files_after"] or writer.error,
            120,
            "the workload to go on",
        )
        writer.finish(60)
        gap = round(writer.longest_gap(asked), 2)
        run.record("io_gap_seconds", gap)
        run.record("gap_goal", p["gap_goal"])
        run.record("failover_files", len(writer.digests))
        run.message(f"longest gap between fsyncs from the kill request: {gap}s")
    with run.step("verify-after-remount"):
        run.sh("umount", MOUNT)
        run.sh("mount", disk, MOUNT)  # reads come from the cluster, not the page cache
        bad = mismatches({**digests, **writer.digests})
        run.record("corrupted_files", len(bad))
        if bad:
            raise StepFailed(f"{len(bad)} fsync'ed files read back wrong: {bad[:10]}")
        if gap >= p["gap_bound"]:
            raise StepFailed(f"IO gap {gap}s: over {p['gap_bound']}s, the failover broke")
    with run.step("umount-logout"):
        run.sh("umount", MOUNT)
        initiator.logout_iface(run, iqn, p["portal"], iface)


def body(run: Run) -> None:
    disk, iface, digests = node_flow(run)
    expand(run, disk)
    fstrim(run)
    failover(run, disk, iface, digests)


if __name__ == "__main__":  # guest/csi_node.py imports the writer from here
    main("cluster", body)
