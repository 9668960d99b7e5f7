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


def stop_writer(proc: subprocess.Popen[bytes], stop: Path) -> None:
    """Ask the verified writer to stop (it polls its stop file; a signal would fail the write
    in flight) and wait for it."""
    stop.touch()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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
    writer = tmp_path / "verified-writer"
    build = run("gcc", "-O2", "-Wall", "-o", str(writer), str(TOOL), "-liscsi")
    assert build.returncode == 0, build.stderr
    vip = cluster.state["portal"]
    vol = cluster.create_exported_volume("failover", "256MiB", INITIATOR)
    target, lun = vol["target_iqn"], vol["lun"]
    admin = {n: cluster.state["daemons"][n]["endpoints"]["admin"] for n in cluster.chunks}
    wait_for(
        lambda: target in run("iscsi-ls", "-i", INITIATOR, f"iscsi://{vip}", timeout=20).stdout,
        30,
        "discovery through the VIP to list the target",
    )

    out, err, stop = tmp_path / "writer.out", tmp_path / "writer.err", tmp_path / "stop"
    url = f"iscsi://{vip}/{target}/{lun}"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [str(writer), url, INITIATOR, str(BLOCKS), str(STRIDE), str(stop)],
            stdout=stdout,
            stderr=stderr,
        )
    try:

        def acks() -> int:
            return sum(line.startswith("A ") for line in out.read_text().splitlines())

        wait_for(lambda: acks() >= 2 * BLOCKS, 60, "the writer to complete two rounds")
        on = [n for n in cluster.chunks if sessions(admin[n]) >= 1]
        assert len(on) == 1, f"the client's session is on {on}, expected exactly one server"
        victim = on[0]
        killed_at = time.monotonic()
        lunastor("dev", "stop", victim, "--kill", "--dir", str(cluster.dir))
        acked_before = acks()
        survivors = [n for n in cluster.chunks if n != victim]
        new_home = wait_for(
            lambda: next((n for n in survivors if sessions(admin[n]) >= 1), None),
            60,
            "the client to log in to a surviving chunk server through the VIP",
        )
        wait_for(
            lambda: acks() >= acked_before + 2 * BLOCKS,
            60,
            "the writer to complete two more rounds after the kill",
        )
    finally:
        stop_writer(proc, stop)
    assert proc.returncode == 0, err.read_text()

    journal = Journal.parse(out.read_text())
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
    image = tmp_path / "after.raw"
    lun_opts = (
        f"driver=iscsi,transport=tcp,portal={cluster.portal(reader)},target={target},lun={lun},"
        f"initiator-name={INITIATOR}"
    )
    conv = run("qemu-img", "convert", "-O", "raw", "--image-opts", lun_opts, str(image))
    assert conv.returncode == 0, conv.stderr
    data = image.read_bytes()
    acked = journal.acked()
    assert len(acked) == BLOCKS
    lost = []
    for b, v in acked.items():
        got = data[b * STRIDE : b * STRIDE + BLOCK]
        allowed = {pattern(b, v)} | {pattern(b, w) for w in journal.issued[b] if w > v}
        if got not in allowed:
            lost.append((b, v, got[:40]))
    assert not lost, f"acknowledged writes lost: {lost}"
    print(f"IO gap {gap:.2f} s ({'within' if gap < GAP_GOAL else 'over'} the {GAP_GOAL} s goal)")
    assert gap < GAP_BOUND, f"IO gap {gap:.2f} s: the client did not resume within {GAP_BOUND} s"
