"""Failover through the VIP across network namespaces, with real chunk servers (issue 7).

The lab of tests/integration/test_redirector_netns.py (etcd + meta on one host, a redirector
holding the VIP 10.77.0.100 on eth0, three chunk hosts, a client), but every chunk host runs
a real `lunastor-chunk` serving the volume's LUN through the replicated data path on
<host>:3260 (no standalone targets). The client runs tests/tools/verified_writer.c through the
VIP; the chunk server holding its session is SIGKILLed; the client must resume on another one
through the VIP, the longest gap between acknowledgements is printed, and every acknowledged
block is read back through the third chunk server. Chunk lease TTL 2 s.
"""

from __future__ import annotations

import re
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
)
from tests.integration.test_redirector_netns import (
    CLIENT_IQN,
    ENV,
    ROOT,
    SECRET_KEY,
    TOKEN,
    VIP,
    Cluster,
    Proc,
)
from tests.support.netns import Host, Lab, netns_available
from tests.support.procs import wait_for

reason = netns_available() or (
    None if shutil.which("gcc") and shutil.which("iscsi-ls") else "gcc and libiscsi-bin needed"
)
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")
CHUNK_LEASE_TTL = 2.0
CLUSTER_SECRET = "netns-test-cluster-secret-0123"


def sessions(host: Host) -> float:
    """A chunk server's open normal sessions, from its /metrics (read inside its host)."""
    text = host.run("curl", "-s", "-m", "5", f"http://{host.address}:9100/metrics", check=False)
    match = re.search(r'^lunastor_iscsi_sessions\{type="normal"\} ([0-9.e+]+)$', text.stdout, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Lab() as lab:
        etcd = lab.add_host("etcd")
        reds = [lab.add_host("red1")]
        chunks = [lab.add_host(f"chunk{i}") for i in (1, 2, 3)]
        client = lab.add_host("client")
        c = Cluster(lab, tmp_path, etcd, reds, chunks, client)
        try:
            _start(c)
            yield c
        finally:
            for proc in c.procs.values():
                proc.kill(signal.SIGTERM)


def _start(c: Cluster) -> None:
    a = c.etcd.address
    c.procs["etcd"] = Proc(
        c.etcd,
        [
            "etcd",
            "--name",
            "lab",
            "--data-dir",
            str(c.directory / "etcd"),
            "--listen-client-urls",
            f"http://{a}:2379",
            "--advertise-client-urls",
            f"http://{a}:2379",
            "--listen-peer-urls",
            f"http://{a}:2380",
            "--initial-advertise-peer-urls",
            f"http://{a}:2380",
            "--initial-cluster",
            f"lab=http://{a}:2380",
        ],
        c.directory / "etcd.log",
    ).start()
    wait_for(
        lambda: "true" in c.etcd.run("curl", "-s", f"http://{a}:2379/health", check=False).stdout,
        30,
        "etcd in its namespace",
    )
    c.daemon(
        "meta",
        c.etcd,
        "lunastor.meta.main",
        {
            "listen": f"{a}:8080",
            "portal": f"{VIP}:3260",
            "lease_ttl": CHUNK_LEASE_TTL,
            "secret_key": SECRET_KEY,
            "auth": {"admin_tokens": [TOKEN]},
            "etcd": c.etcd_settings(),
            "log": {"level": "info", "format": "kv"},
        },
    )
    for i, host in enumerate(c.chunks, 1):
        data = c.directory / f"chunk{i}-data"
        data.mkdir()
        c.daemon(
            f"chunk{i}",
            host,
            "lunastor.chunk.main",
            {
                "data_dirs": [str(data)],
                "zone": f"zone{i}",
                "iscsi_listen": f"{host.address}:3260",
                "iscsi_advertise": f"{host.address}:3260",
                "data_listen": f"{host.address}:3270",
                "admin_listen": f"{host.address}:9100",
                "lease_ttl": CHUNK_LEASE_TTL,
                "cluster_secret": CLUSTER_SECRET,
                "secret_key": SECRET_KEY,
                "etcd": c.etcd_settings(),
                "log": {"level": "info", "format": "kv"},
            },
        )
    wait_for(lambda: c.healthy(c.etcd, f"{a}:8080"), 60, "meta to answer")

    def all_up() -> bool:
        items = c.call("GET", "/v1/chunks")["items"]
        return sum(i["state"] == "up" for i in items) == 3

    wait_for(all_up, 60, "three chunk servers up")
    vol = c.call("POST", "/v1/volumes", {"name": "failover", "size_bytes": VOLUME}, ok=(201,))
    c.call("POST", f"/v1/volumes/{vol['id']}/exports", {"initiator": CLIENT_IQN}, ok=(201,))
    c.target, c.lun = vol["target_iqn"], vol["lun"]
    c.start_redirector(0)
    wait_for(lambda: c.holders(), 60, "the redirector to hold the VIP")
    wait_for(lambda: (c.redirector_health(0) or {}).get("serving"), 30, "the redirector to serve")
    wait_for(
        lambda: c.target in c.client_run("iscsi-ls", "-i", CLIENT_IQN, f"iscsi://{VIP}").stdout,
        30,
        "discovery through the VIP to list the target",
    )


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
        on = [h for h in cluster.chunks if sessions(h) >= 1]
        assert len(on) == 1, f"the client's session is on {on}, expected exactly one server"
        victim = on[0]
        name = f"chunk{cluster.chunks.index(victim) + 1}"
        killed_at = time.monotonic()
        cluster.procs[name].kill(signal.SIGKILL)
        acked_before = acks()
        survivors = [h for h in cluster.chunks if h is not victim]
        new_home = wait_for(
            lambda: next((h for h in survivors if sessions(h) >= 1), None),
            60,
            "the client to log in to a surviving chunk server through the VIP",
        )
        wait_for(
            lambda: acks() >= acked_before + 2 * BLOCKS,
            60,
            "the writer to complete two more rounds after the kill",
        )
    finally:
        stop.touch()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
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
