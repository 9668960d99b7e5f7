"""Failover through the VIP: SIGKILL of the chunk server a client is logged in to, during a
verified write workload (issue 7).

A loopback dev cluster (`lunastor dev up`: etcd, meta, three chunk servers, the redirector on
a 127.x VIP; lease TTL 2 s). A libiscsi client (tests/tools/verified_writer.c) logs in through
the VIP, is redirected to the chunk server rendezvous hashing picks, and writes versioned
self-checking 4 KiB blocks, recording every acknowledgement and its time. That chunk server is
SIGKILLed mid-workload: libiscsi logs in again to the VIP, which redirects it, once the dead
server's lease has expired, to a live one, and the workload continues there. The longest gap
between acknowledgements is measured and printed; then every block is read back through the
third chunk server and must hold its latest acknowledged version (or a later attempted one).
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.chunk.test_replicated_cluster import Cluster, run
from tests.support.devcluster import dev_up, lunastor
from tests.support.procs import wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("iscsi-ls") is None,
    reason="gcc and libiscsi-bin are needed",
)
INITIATOR = "iqn.2026-11.org.example:failover-client"
TOOL = Path(__file__).resolve().parents[1] / "tools" / "verified_writer.c"
BLOCK = 4096
MIB = 1 << 20
VOLUME = 256 * MIB  # four 64 MiB extents: their primaries spread over the chunk servers
BLOCKS = 64
STRIDE = VOLUME // BLOCKS
GAP_GOAL = 5.0  # seconds without an acknowledgement, issue 7's goal (printed, measured)
# The assertion is a safety bound, not the goal: on a loaded 2-core CI machine the gap was
# 2.2-5.1 s; performance is measured, not asserted in timed tests. Over this, failover broke.
GAP_BOUND = 15.0


def pattern(block: int, version: int) -> bytes:
    """The bytes verified_writer.c writes as `version` of `block`."""
    data = bytearray((i * 131 + block * 7 + version * 13) & 0xFF for i in range(BLOCK))
    head = f"lunastor block {block} version {version}\n".encode()
    data[: len(head)] = head
    return bytes(data)


@dataclass
class Journal:
    """What the writer issued and what was acknowledged, from its output."""

    acks: list[tuple[float, int, int]] = field(default_factory=list)  # (time, block, version)
    issued: dict[int, set[int]] = field(default_factory=dict)
    failed: int = 0

    @classmethod
    def parse(cls, text: str) -> Journal:
        journal = cls()
        for line in text.splitlines():
            kind, block, version, at = line.split()
            b, v = int(block), int(version)
            if kind == "I":
                journal.issued.setdefault(b, set()).add(v)
            elif kind == "A":
                journal.acks.append((float(at), b, v))
            else:
                journal.failed += 1
        return journal

    def acked(self) -> dict[int, int]:
        latest: dict[int, int] = {}
        for _, b, v in self.acks:
            latest[b] = max(v, latest.get(b, 0))
        return latest

    def stalls(self, over: float = 0.5) -> list[float]:
        """Every gap between successive acknowledgements longer than `over` seconds."""
        times = [t for t, _, _ in self.acks]
        return [round(b - a, 2) for a, b in itertools.pairwise(times) if b - a > over]

    def longest_gap(self) -> tuple[float, float]:
        """The longest time between two successive acknowledgements: (gap, its start)."""
        times = [t for t, _, _ in self.acks]
        return max(((b - a, a) for a, b in itertools.pairwise(times)), default=(0.0, 0.0))


def lun_opts(portal: str, target: str, lun: int) -> str:
    """qemu's --image-opts for the LUN through `portal`, as INITIATOR."""
    return (
        f"driver=iscsi,transport=tcp,portal={portal},target={target},lun={lun},"
        f"initiator-name={INITIATOR}"
    )


def read_back_lost(
    portal: str, target: str, lun: int, journal: Journal, tmp_path: Path
) -> list[tuple[int, int, bytes]]:
    """The volume read whole through `portal` with qemu-img: every acknowledged write that is
    not there, neither it nor a later version the writer issued, as (block, version, start)."""
    image = tmp_path / "after.raw"
    conv = run(
        "qemu-img",
        "convert",
        "-O",
        "raw",
        "--image-opts",
        lun_opts(portal, target, lun),
        str(image),
    )
    assert conv.returncode == 0, conv.stderr
    data = image.read_bytes()
    lost = []
    for b, v in journal.acked().items():
        got = data[b * STRIDE : b * STRIDE + BLOCK]
        if got not in {pattern(b, v)} | {pattern(b, w) for w in journal.issued[b] if w > v}:
            lost.append((b, v, got[:40]))
    return lost


def stop_writer(proc: subprocess.Popen[bytes], stop: Path) -> None:
    """Ask the verified writer to stop (it polls its stop file; a signal would fail the write
    in flight) and wait for it."""
    stop.touch()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class VipWriter:
    """The verified writer on a new volume exported to INITIATOR, through the cluster's VIP
    (the target listed by discovery first), writing until `finish`."""

    def __init__(self, cluster: Cluster, tmp_path: Path, name: str) -> None:
        binary = tmp_path / "verified-writer"
        build = run("gcc", "-O2", "-Wall", "-o", str(binary), str(TOOL), "-liscsi")
        assert build.returncode == 0, build.stderr
        vip = cluster.state["portal"]
        self.vol = cluster.create_exported_volume(name, "256MiB", INITIATOR)
        self.target, self.lun = self.vol["target_iqn"], self.vol["lun"]
        wait_for(
            lambda: (
                self.target in run("iscsi-ls", "-i", INITIATOR, f"iscsi://{vip}", timeout=20).stdout
            ),
            30,
            "discovery through the VIP to list the target",
        )
        self.out, self.stop = tmp_path / "writer.out", tmp_path / "stop"
        self.err = tmp_path / "writer.err"
        url = f"iscsi://{vip}/{self.target}/{self.lun}"
        with self.out.open("w") as stdout, self.err.open("w") as stderr:
            self.proc = subprocess.Popen(
                [str(binary), url, INITIATOR, str(BLOCKS), str(STRIDE), str(self.stop)],
                stdout=stdout,
                stderr=stderr,
            )

    def acks(self) -> int:
        return sum(line.startswith("A ") for line in self.out.read_text().splitlines())

    def rounds(self, n: int, timeout: float, what: str) -> None:
        """Wait for `n` more rounds (every block written once each) to be acknowledged."""
        start = self.acks()
        wait_for(lambda: self.acks() >= start + n * BLOCKS, timeout, what)

    def halt(self) -> None:
        """Stop it after the write in flight (for a `finally`: it never raises)."""
        stop_writer(self.proc, self.stop)

    def journal(self) -> Journal:
        """What it issued and what was acknowledged; it must have exited cleanly."""
        assert self.proc.returncode == 0, self.err.read_text()
        return Journal.parse(self.out.read_text())

    def serves(self, portal: str) -> bool:
        """Whether `portal` opens the LUN now (qemu-img info)."""
        info = run("qemu-img", "info", "--image-opts", lun_opts(portal, self.target, self.lun))
        return info.returncode == 0

    def lost(self, portal: str, journal: Journal, tmp_path: Path) -> list[tuple[int, int, bytes]]:
        """Acknowledged writes not found when the volume is read back through `portal`."""
        return read_back_lost(portal, self.target, self.lun, journal, tmp_path)


def sessions(admin: str) -> float:
    """A chunk server's open normal sessions, from its /metrics."""
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    match = re.search(r'^lunastor_iscsi_sessions\{type="normal"\} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    directory = tmp_path / "dev"
    state = dev_up(directory, chunks=3, lease_ttl=2.0)
    try:
        yield Cluster(directory, state)
    finally:
        lunastor("dev", "down", "--dir", str(directory), check=False)


def test_sigkill_of_the_clients_chunk_server_loses_no_acknowledged_write(
    cluster: Cluster, tmp_path: Path
) -> None:
    writer = VipWriter(cluster, tmp_path, "failover")
    admin = {n: cluster.state["daemons"][n]["endpoints"]["admin"] for n in cluster.chunks}
    try:
        writer.rounds(2, 60, "the writer to complete two rounds")
        on = [n for n in cluster.chunks if sessions(admin[n]) >= 1]
        assert len(on) == 1, f"the client's session is on {on}, expected exactly one server"
        victim = on[0]
        killed_at = time.monotonic()
        lunastor("dev", "stop", victim, "--kill", "--dir", str(cluster.dir))
        acked_before = writer.acks()
        survivors = [n for n in cluster.chunks if n != victim]
        new_home = wait_for(
            lambda: next((n for n in survivors if sessions(admin[n]) >= 1), None),
            60,
            "the client to log in to a surviving chunk server through the VIP",
        )
        wait_for(
            lambda: writer.acks() >= acked_before + 2 * BLOCKS,
            60,
            "the writer to complete two more rounds after the kill",
        )
    finally:
        writer.halt()
    journal = writer.journal()
    err = writer.err
    gap, gap_start = journal.longest_gap()
    print(
        f"\nfailover: {victim} SIGKILLed, the client resumed on {new_home}; longest gap between "
        f"acknowledgements {gap:.2f} s, from an acknowledgement {gap_start - killed_at:+.2f} s "
        f"after `lunastor dev stop {victim} --kill` started; {len(journal.acks)} writes "
        f"acknowledged, {journal.failed} failed; all gaps over 0.5 s: {journal.stalls()}\n"
        f"writer's stderr: {err.read_text().strip() or '(empty)'}"
    )
    assert journal.failed == 0, err.read_text()

    # every block, read through the chunk server the client is not on
    reader = next(n for n in survivors if n != new_home)
    assert len(journal.acked()) == BLOCKS
    lost = writer.lost(cluster.portal(reader), journal, tmp_path)
    assert not lost, f"acknowledged writes lost: {lost}"
    print(f"IO gap {gap:.2f} s ({'within' if gap < GAP_GOAL else 'over'} the {GAP_GOAL} s goal)")
    assert gap < GAP_BOUND, f"IO gap {gap:.2f} s: the client did not resume within {GAP_BOUND} s"
