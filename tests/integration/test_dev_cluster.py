"""`lunastor dev up` runs real daemons that register in a real etcd; failures show in status."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.devcluster import (
    LUNASTOR,
    cluster_status,
    dev_up,
    lunastor,
    pid_alive,
    random_prefix,
    read_state,
)
from tests.support.procs import wait_for

LEASE_TTL = 2.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("dev")
    dev_up(directory, chunks=3, lease_ttl=LEASE_TTL)
    yield directory
    lunastor("dev", "down", "--dir", str(directory))


def _states(status: dict[str, Any]) -> dict[str, str]:
    return {c["portal"]: c["state"] for c in status["chunk_servers"]}


def test_three_chunk_servers_up_with_capacity(cluster: Path) -> None:
    status = wait_for(
        lambda: (s := cluster_status(cluster))["summary"]["chunk_servers_up"] == 3 and s,
        30,
        "3 chunk servers up",
    )
    for chunk in status["chunk_servers"]:
        assert chunk["state"] == "up"
        assert chunk["capacity"] > 0 and 0 < chunk["free"] <= chunk["capacity"]
        assert chunk["version"]
    assert {c["zone"] for c in status["chunk_servers"]} == {"zone1", "zone2", "zone3"}
    assert status["redirector_leader"]["id"] == "redirector1"
    assert len(status["meta_instances"]) == 1
    table = lunastor("cluster", "status", "--dir", str(cluster)).stdout
    assert "3/3 chunk servers up" in table and "redirector1" in table


def test_sigkilled_chunk_server_is_down_within_its_lease_ttl(cluster: Path) -> None:
    state = read_state(cluster)
    victim = state["daemons"]["chunk2"]
    portal = victim["endpoints"]["portal"]
    before = cluster_status(cluster)
    chunk_id = next(c["id"] for c in before["chunk_servers"] if c["portal"] == portal)
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(
        lambda: _states(cluster_status(cluster))[portal] == "down",
        LEASE_TTL + 5,
        "the killed chunk server to show down",
    )
    elapsed = time.monotonic() - killed_at
    # etcd expires leases on its own schedule (TTL plus up to ~1 s of leader tick slack)
    assert elapsed <= LEASE_TTL + 2.0, f"down after {elapsed:.1f}s with a {LEASE_TTL}s lease"
    assert {s for p, s in _states(cluster_status(cluster)).items() if p != portal} == {"up"}
    # it comes back with the same stable id
    lunastor("dev", "start", "chunk2", "--dir", str(cluster))
    status = wait_for(
        lambda: (s := cluster_status(cluster))["summary"]["chunk_servers_up"] == 3 and s,
        30,
        "chunk2 back up",
    )
    assert chunk_id in {c["id"] for c in status["chunk_servers"]}
    assert len(status["chunk_servers"]) == 3


def test_dev_stop_and_start_by_name(cluster: Path) -> None:
    lunastor("dev", "stop", "chunk3", "--dir", str(cluster))
    state = read_state(cluster)
    assert state["daemons"]["chunk3"]["pid"] is None
    # a clean stop revokes the lease: down at once, not after the TTL
    portal = state["daemons"]["chunk3"]["endpoints"]["portal"]
    assert _states(cluster_status(cluster))[portal] == "down"
    err = lunastor("dev", "stop", "chunk3", "--dir", str(cluster), check=False)
    assert err.returncode == 1 and "chunk3 is not running" in err.stderr
    err = lunastor("dev", "start", "nosuch", "--dir", str(cluster), check=False)
    assert err.returncode == 1 and "no daemon named 'nosuch'" in err.stderr
    lunastor("dev", "start", "chunk3", "--dir", str(cluster))
    wait_for(lambda: _states(cluster_status(cluster))[portal] == "up", 30, "chunk3 up")


def _children_of_state(directory: Path) -> list[int]:
    return [d["pid"] for d in read_state(directory)["daemons"].values() if d["pid"]]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_foreground_cluster_leaves_no_orphans(tmp_path: Path, sig: int) -> None:
    """Ctrl-C / SIGTERM stop every child cleanly; even a SIGKILLed supervisor takes them along."""
    proc = subprocess.Popen(
        [
            *LUNASTOR,
            "dev",
            "up",
            "--dir",
            str(tmp_path),
            "--chunks",
            "1",
            "--address-prefix",
            random_prefix(),
            "--lease-ttl",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        wait_for(
            lambda: (
                (tmp_path / "cluster.json").exists()
                and len(_children_of_state(tmp_path)) == 4
                and "REST API" in (proc.stdout.readline() if proc.stdout else "")
            ),
            60,
            "the dev cluster to be up",
        )
        children = _children_of_state(tmp_path)
        assert all(pid_alive(p) for p in children)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        wait_for(
            lambda: not any(pid_alive(p) for p in children),
            10,
            f"every child to exit after signal {sig}",
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_errors_are_one_line(tmp_path: Path) -> None:
    out = lunastor("cluster", "status", "--dir", str(tmp_path), check=False)
    assert out.returncode == 1
    assert "no dev cluster in" in out.stderr and "Traceback" not in out.stderr
    out = lunastor("dev", "down", "--dir", str(tmp_path), check=False)
    assert out.returncode == 0 and "no dev cluster running" in out.stdout
    out = lunastor("dev", "up", "--dir", str(tmp_path), "--address-prefix", "10.0", check=False)
    assert out.returncode == 1 and "--address-prefix must look like 127.N" in out.stderr


def test_make_run_prints_commands_that_reach_the_demo_volume(tmp_path: Path) -> None:
    """`make run` runs `dev up --demo`: the printed iscsi-inq, iscsi-readcapacity16 and qemu-img
    commands must work as printed (through the VIP and the redirector)."""
    out = lunastor(
        "dev",
        "up",
        "--detach",
        "--demo",
        "--dir",
        str(tmp_path),
        "--lease-ttl",
        "2",
        "--address-prefix",
        random_prefix(),
    ).stdout
    try:
        commands = dict(
            line.strip().split(":", 1)[0:2]
            for line in out.splitlines()
            if line.startswith("  ") and ":" in line
        )
        assert "demo volume   demo: 1 GiB" in out, out
        for what, expect in (
            ("identify", "LUNASTOR"),
            ("capacity", "1073741824"),
            ("qemu-img", "virtual size: 1 GiB"),
        ):
            command = commands[what].strip()
            result = subprocess.run(
                ["bash", "-c", command], capture_output=True, text=True, timeout=60, cwd=tmp_path
            )
            assert result.returncode == 0 and expect in result.stdout, (command, result)
        assert "iscsiadm -m discovery -t sendtargets -p " in out
        # printing it again is harmless: the demo volume is created idempotently
        from lunastor.cli.demo import create_demo

        assert create_demo(read_state(tmp_path))["lun"] >= 1
    finally:
        lunastor("dev", "down", "--dir", str(tmp_path))
