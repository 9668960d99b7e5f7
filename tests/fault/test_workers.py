"""A dev cluster whose chunk servers run two worker processes each (lunastor/chunk/workers.py,
docs/scale.md): the verified writer through the VIP keeps writing; on every server only the
volume's worker holds its replicas and the session is handed to that worker; a SIGKILL of one
worker, or of a server's first process, takes the whole server at once (the crash guard
revokes its lease when its last process is gone): the survivors take over its extents without
waiting for the lease, and every acknowledged write reads back through another server.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.systems.devcluster import worker_pids
from lunastor.chunk.workers import owner
from tests.integration.chunk.test_replicated_cluster import Cluster, _extents
from tests.integration.test_redirector_failover import VipWriter, sessions
from tests.support.devcluster import dev_up, lunastor, pid_alive
from tests.support.procs import wait_for

LEASE_TTL = 8.0
# Without the guard the takeover waits for the lease: 8 s at least. Measured gaps on the loaded
# 2-core machine: 2.5-3.9 s (one run over 4 s), so the bound sits between.
GAP_BOUND = LEASE_TTL * 0.75


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    directory = tmp_path / "dev"
    state = dev_up(directory, chunks=3, lease_ttl=LEASE_TTL, chunk_workers=2)
    try:
        yield Cluster(directory, state)
    finally:
        lunastor("dev", "down", "--dir", str(directory), check=False)


def worker_pid(parent: int) -> int:
    """Worker 1 of the chunk server whose first process is `parent`."""
    found = worker_pids(parent)
    assert len(found) == 1, f"chunk server {parent}: workers {found}"
    return found[0]


def open_extents(pid: int, volume_id: str) -> set[int]:
    """Extent indexes of `volume_id` whose replica data file process `pid` holds open."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        path = Path(target)
        if path.parent.name == volume_id and path.suffix == ".dat":
            out.add(int(path.stem, 16))
    return out


def worker_admin(admin: str) -> str:
    host, _, port = admin.rpartition(":")
    return f"{host}:{int(port) + 1}"


@pytest.mark.parametrize("victim_process", ["worker", "first"])
def test_sigkill_of_either_process_of_a_two_worker_server_loses_no_acknowledged_write(
    cluster: Cluster, tmp_path: Path, victim_process: str
) -> None:
    writer = VipWriter(cluster, tmp_path, "workers")
    vol = writer.vol
    daemons = cluster.state["daemons"]
    admin = {n: daemons[n]["endpoints"]["admin"] for n in cluster.chunks}
    first = {n: int(daemons[n]["pid"]) for n in cluster.chunks}
    worker = {n: worker_pid(first[n]) for n in cluster.chunks}
    try:
        writer.rounds(2, 90, "the writer to complete two rounds")
        # the volume's worker on every server holds its replicas, the other worker none
        mine = owner(vol["id"], 2)
        owning = worker if mine else first
        other = first if mine else worker
        held = set()
        for n in cluster.chunks:
            assert not open_extents(other[n], vol["id"]), n
            held |= open_extents(owning[n], vol["id"])
        assert held == {0, 1, 2, 3}
        # every extent has its three members: one a server starting while the extent was
        # allocated took for a wiped disk's and left (issue 14) made the kill leave that
        # extent below min_replicas, waiting `replace_after` (60 s) for a join
        short = {i: r.replicas for i, r in _extents(cluster.state, vol["id"]).items()}
        assert all(len(m) == 3 for m in short.values()), f"members before the kill: {short}"
        # and the session was handed to that worker: its IO takes no hop
        at = {n: [sessions(admin[n]), sessions(worker_admin(admin[n]))] for n in cluster.chunks}
        on = [n for n in cluster.chunks if sum(at[n]) >= 1]
        assert len(on) == 1, f"the client's session is on {on}, expected exactly one server"
        assert at[on[0]][mine] == 1, f"sessions per worker {at}, the volume's worker is {mine}"
        victim = on[0]
        victim_id = cluster.chunk_id(victim)
        pid = worker[victim] if victim_process == "worker" else first[victim]
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: not pid_alive(first[victim]) and not pid_alive(worker[victim]),
            10,
            f"both processes of {victim} to be gone",
        )
        gone_after = time.monotonic() - killed_at
        survivors = [n for n in cluster.chunks if n != victim]
        writer.rounds(2, 90, "the writer to complete two more rounds after the kill")
    finally:
        writer.halt()
    journal = writer.journal()
    gap, gap_start = journal.longest_gap()
    after = _extents(cluster.state, vol["id"])
    print(
        f"\nworkers: {victim_process} process of {victim} (the session's server) SIGKILLed; "
        f"the server was gone after {gone_after:.2f} s; longest gap {gap:.2f} s, from "
        f"{gap_start - killed_at:+.2f} s after the kill; {len(journal.acks)} acknowledged, "
        f"{journal.failed} failed"
    )
    assert journal.failed == 0, writer.err.read_text()
    assert all(victim_id not in r.replicas for r in after.values())
    assert gap < GAP_BOUND, f"IO gap {gap:.2f} s: the takeover waited for the lease"
    lost = writer.lost(cluster.portal(survivors[0]), journal, tmp_path)
    assert not lost, f"acknowledged writes lost: {lost}"
