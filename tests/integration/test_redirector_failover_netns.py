"""Failover through the VIP across network namespaces, with real chunk servers (issue 7).

The lab of tests/integration/test_redirector_netns.py, built by its `start_lab` (etcd + meta
on one host, three chunk hosts each running only `lunastor-chunk`, serving the volume's LUN
through the replicated data path on <host>:3260, a client), here with one redirector holding
the VIP 10.77.0.100 on eth0. The client runs tests/tools/verified_writer.c through the VIP;
the chunk server holding its session is SIGKILLed; the client must resume on another one
through the VIP, the longest gap between acknowledgements is printed, and every acknowledged
block is read back through the third chunk server. Chunk lease TTL 2 s.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_redirector_failover import (
    BLOCK,
    BLOCKS,
    GAP_GOAL,
    STRIDE,
    TOOL,
    VOLUME,
    Journal,
    pattern,
    stop_writer,
)
from tests.integration.test_redirector_netns import (
    CLIENT_IQN,
    ENV,
    ROOT,
    Cluster,
    normal_sessions,
    start_lab,
)
from tests.support.netns import Lab, netns_available
from tests.support.procs import wait_for

reason = netns_available() or (
    None if shutil.which("gcc") and shutil.which("iscsi-ls") else "gcc and libiscsi-bin needed"
)
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")
CHUNK_LEASE_TTL = 2.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Lab() as lab:
        etcd = lab.add_host("etcd")
        reds = [lab.add_host("red1")]
        chunks = [lab.add_host(f"chunk{i}") for i in (1, 2, 3)]
        client = lab.add_host("client")
        c = Cluster(lab, tmp_path, etcd, reds, chunks, client)
        try:
            start_lab(c, lease_ttl=CHUNK_LEASE_TTL, volume="failover", size=VOLUME)
            yield c
        finally:
            for proc in c.procs.values():
                proc.kill(signal.SIGTERM)


def test_sigkill_of_the_clients_chunk_server_across_namespaces(
    cluster: Cluster, tmp_path: Path
) -> None:
    writer = tmp_path / "verified-writer"
    build = subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(writer), str(TOOL), "-liscsi"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    out, err, stop = tmp_path / "writer.out", tmp_path / "writer.err", tmp_path / "stop"
    argv = [str(writer), cluster.url(), CLIENT_IQN, str(BLOCKS), str(STRIDE), str(stop)]
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            cluster.client.cmd(*argv), stdout=stdout, stderr=stderr, env=ENV, cwd=ROOT
        )
    try:

        def acks() -> int:
            return sum(line.startswith("A ") for line in out.read_text().splitlines())

        wait_for(lambda: acks() >= 2 * BLOCKS, 60, "the writer to complete two rounds")
        on = [h for h in cluster.chunks if normal_sessions(h) >= 1]
        assert len(on) == 1, f"the client's session is on {on}, expected exactly one server"
        victim = on[0]
        name = f"chunk{cluster.chunks.index(victim) + 1}"
        killed_at = time.monotonic()
        cluster.procs[name].kill(signal.SIGKILL)
        acked_before = acks()
        survivors = [h for h in cluster.chunks if h is not victim]
        new_home = wait_for(
            lambda: next((h for h in survivors if normal_sessions(h) >= 1), None),
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
        f"\nfailover (netns): {name} ({victim.address}) SIGKILLed, the client resumed on "
        f"{new_home.address}; longest gap between acknowledgements {gap:.2f} s, starting "
        f"{gap_start - killed_at:+.2f} s from the SIGKILL; "
        f"{len(journal.acks)} writes acknowledged, {journal.failed} failed; all gaps over "
        f"0.5 s: {journal.stalls()}\n"
        f"writer's stderr: {err.read_text().strip() or '(empty)'}"
    )
    assert journal.failed == 0, err.read_text()

    reader = next(h for h in survivors if h is not new_home)
    image = tmp_path / "after.raw"
    lun_opts = (
        f"driver=iscsi,transport=tcp,portal={reader.address}:3260,target={cluster.target},"
        f"lun={cluster.lun},initiator-name={CLIENT_IQN}"
    )
    conv = cluster.client_run(
        "qemu-img", "convert", "-O", "raw", "--image-opts", lun_opts, str(image)
    )
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
    assert gap < GAP_GOAL, f"IO gap {gap:.2f} s is over the {GAP_GOAL} s goal"
