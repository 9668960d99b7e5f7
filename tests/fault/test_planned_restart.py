"""Planned restarts and a whole cluster coming back (docs/faults.md, "Planned restarts"),
on a real dev cluster (3 chunk servers, a 3-replica volume of four 64 MiB extents, lease TTL
2 s) with the verified writer (tests/tools/verified_writer.c) logged in through the VIP:

* `lunastor dev down` then `dev up` of the same cluster: every extent serves again within
  seconds of `dev up` returning, no replica was removed and nothing copied (the member sets
  are those from before, no removal, failover, convergence or join in any chunk log), and
  every acknowledged write reads back through every chunk server;
* a rolling restart (SIGTERM, start again) of one chunk server after another under the
  writer: 0 failed writes, 0 acknowledged writes lost, no replica removed;
* a primary SIGKILLed and started again at once: the writer goes on (the crash guard's
  failover), 0 failed, 0 lost;
* every chunk server SIGKILLed at once, then started again one after another: every extent serves
  again with no operator, every acknowledged write (each one is durable: the verified
  writer writes with FUA) reads back, and no replica was removed: a member left one
  unacknowledged write behind the primary by the crash is converged in place.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.chunk.test_replicated_cluster import Cluster, _extents, run
from tests.integration.test_redirector_failover import STRIDE, VipWriter, lun_opts
from tests.support.devcluster import dev_up, lunastor, pid_alive, read_state
from tests.support.procs import wait_for

LEASE_TTL = 2.0
EXTENTS = 4
# what a chunk log says when an extent's replica set changes other than by a clean hand-over
CHURN = re.compile(
    r"removed \[|replaced by|blocks copied to|joined \(gen|converging since gen|replica is lost"
)
# ... when a member is removed or (re-)joined: not a convergence in place
REMOVALS = re.compile(r"removed \[|joined \(gen|replica is lost")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    directory = tmp_path / "dev"
    state = dev_up(directory, chunks=3, lease_ttl=LEASE_TTL)
    try:
        yield Cluster(directory, state)
    finally:
        lunastor("dev", "down", "--dir", str(directory), check=False)


def members(cluster: Cluster, volume: str) -> dict[int, list[str]]:
    """Each extent's members (names, sorted): who holds it, whoever is primary."""
    got = _extents(cluster.state, volume)
    return {i: sorted(cluster.name_of(m) for m in r.replicas) for i, r in got.items()}


def churn(cluster: Cluster, what: re.Pattern[str] = CHURN) -> list[str]:
    """Every chunk log line (since the cluster was made) that changed a replica set."""
    lines = []
    for name in cluster.chunks:
        log = cluster.dir / "logs" / f"{name}.log"
        lines += [f"{name}: {ln}" for ln in log.read_text().splitlines() if what.search(ln)]
    return lines


def write_each_extent(cluster: Cluster, writer: VipWriter, portal: str) -> bool:
    """One 4 KiB write into each extent through `portal` (beside the writer's blocks)."""
    cmds = []
    for i in range(EXTENTS):
        cmds += ["-c", f"write -P 0x5a {i * 64 * (1 << 20) + STRIDE // 2} 4k"]
    opts = lun_opts(portal, writer.target, writer.lun)
    return run("qemu-io", "--image-opts", opts, *cmds, timeout=120).returncode == 0


def serves_everywhere(cluster: Cluster, writer: VipWriter) -> bool:
    return all(writer.serves(cluster.portal(n)) for n in cluster.chunks) and write_each_extent(
        cluster, writer, cluster.portal(cluster.chunks[0])
    )


def test_dev_down_and_up_serves_at_once_with_no_replica_removed_and_nothing_copied(
    cluster: Cluster, tmp_path: Path
) -> None:
    writer = VipWriter(cluster, tmp_path, "restart")
    vol = writer.vol["id"]
    try:
        writer.rounds(2, 120, "the writer to complete two rounds")
    finally:
        writer.halt()
    journal = writer.journal()
    assert journal.failed == 0, writer.err.read_text()
    before = members(cluster, vol)
    assert len(before) == EXTENTS and all(len(m) == 3 for m in before.values()), before
    churn_before = churn(cluster)
    prefix = ".".join(cluster.portal(cluster.chunks[0]).split(".")[:2])

    t0 = time.monotonic()
    lunastor("dev", "down", "--dir", str(cluster.dir))
    down_s = time.monotonic() - t0
    t0 = time.monotonic()
    lunastor(
        "dev", "up", "--detach", "--dir", str(cluster.dir), "--chunks", "3",
        "--address-prefix", prefix, "--lease-ttl", str(LEASE_TTL),
    )  # fmt: skip
    up_s = time.monotonic() - t0
    cluster.state = read_state(cluster.dir)
    t0 = time.monotonic()
    wait_for(lambda: serves_everywhere(cluster, writer), 60, "every extent to serve again")
    serve_s = time.monotonic() - t0
    after = members(cluster, vol)
    changes = churn(cluster)[len(churn_before) :]
    print(
        f"\ndev down {down_s:.1f} s, dev up {up_s:.1f} s; every extent read through every "
        f"server and written {serve_s:.2f} s after dev up returned; members before {before}, "
        f"after {after}; replica set changes in the logs: {changes or 'none'}"
    )
    assert after == before, "a replica was removed or added across the restart"
    assert not changes, changes
    for name in cluster.chunks:
        lost = writer.lost(cluster.portal(name), journal, tmp_path)
        assert not lost, f"acknowledged writes lost, read through {name}: {lost}"


def test_a_rolling_restart_under_the_writer_loses_nothing_and_removes_no_replica(
    cluster: Cluster, tmp_path: Path
) -> None:
    rolling_restart(cluster, tmp_path)


def test_a_rolling_restart_of_servers_of_two_workers(tmp_path: Path) -> None:
    """The same with `workers = 2` (chunk/workers.py): worker 0 speaks for the server, each
    worker hands over the extents it owns."""
    directory = tmp_path / "dev"
    try:
        state = dev_up(directory, chunks=3, lease_ttl=LEASE_TTL, chunk_workers=2)
        rolling_restart(Cluster(directory, state), tmp_path)
    finally:
        lunastor("dev", "down", "--dir", str(directory), check=False)


def rolling_restart(cluster: Cluster, tmp_path: Path) -> None:
    writer = VipWriter(cluster, tmp_path, "rolling")
    vol = writer.vol["id"]
    timings = []
    try:
        writer.rounds(2, 120, "the writer to complete two rounds")
        before = members(cluster, vol)
        churn_before = churn(cluster)
        for name in cluster.chunks:
            t0 = time.monotonic()
            lunastor("dev", "stop", name, "--dir", str(cluster.dir))
            stopped = time.monotonic() - t0
            lunastor("dev", "start", name, "--dir", str(cluster.dir))
            started = time.monotonic() - t0
            writer.rounds(1, 120, f"a round of writes after {name} restarted")
            timings.append(f"{name}: stop {stopped:.1f} s, back {started:.1f} s")
        cluster.state = read_state(cluster.dir)
    finally:
        writer.halt()
    journal = writer.journal()
    gap, _ = journal.longest_gap()
    after = members(cluster, vol)
    changes = churn(cluster)[len(churn_before) :]
    print(
        f"\nrolling restart: {'; '.join(timings)}; {len(journal.acks)} acknowledged, "
        f"{journal.failed} failed, longest gap {gap:.2f} s, gaps over 0.5 s: "
        f"{journal.stalls()}; members before {before}, after {after}; replica set changes: "
        f"{changes or 'none'}"
    )
    assert journal.failed == 0, writer.err.read_text()
    assert after == before, "a replica was removed or added by the rolling restart"
    assert not changes, changes
    lost = writer.lost(cluster.portal(cluster.chunks[0]), journal, tmp_path)
    assert not lost, f"acknowledged writes lost: {lost}"


def test_every_chunk_server_sigkilled_and_back_serves_without_an_operator(
    cluster: Cluster, tmp_path: Path
) -> None:
    writer = VipWriter(cluster, tmp_path, "crashall")
    vol = writer.vol["id"]
    try:
        writer.rounds(2, 120, "the writer to complete two rounds")
        before = members(cluster, vol)
        churn_before = churn(cluster, REMOVALS)
        # all at once, as a power loss would (one after another, the survivors would rightly
        # fail the first victims' extents over: a crash of one server)
        daemons = read_state(cluster.dir)["daemons"]
        for name in cluster.chunks:
            os.kill(daemons[name]["pid"], signal.SIGKILL)
        for name in cluster.chunks:
            wait_for(lambda n=name: not pid_alive(daemons[n]["pid"]), 10, f"{name} to die")
        acked = writer.acks()
        t0 = time.monotonic()
        for name in cluster.chunks:
            lunastor("dev", "start", name, "--dir", str(cluster.dir))
        started = time.monotonic() - t0
        cluster.state = read_state(cluster.dir)
        wait_for(lambda: writer.acks() > acked, 120, "the writer to resume")
        resumed = time.monotonic() - t0
        writer.rounds(1, 120, "a round of writes after the restart")
    finally:
        writer.halt()
    journal = writer.journal()
    after = members(cluster, vol)
    changes = churn(cluster, REMOVALS)[len(churn_before) :]
    converged = [ln for ln in churn(cluster) if "copied to" in ln]
    print(
        f"\nwhole-cluster SIGKILL: the three servers started in {started:.1f} s, the writer "
        f"resumed {resumed:.1f} s after the first start; {len(journal.acks)} acknowledged, "
        f"{journal.failed} failed; members before {before}, after {after}; removals or "
        f"joins: {changes or 'none'}; convergences: {converged or 'none'}"
    )
    wait_for(lambda: serves_everywhere(cluster, writer), 60, "every extent to serve")
    for name in cluster.chunks:
        lost = writer.lost(cluster.portal(name), journal, tmp_path)
        assert not lost, f"acknowledged writes lost, read through {name}: {lost}"
    assert after == before, "a replica was removed or added across the restart"
    assert not changes, changes


def test_a_primary_sigkilled_and_restarted_at_once_resumes_without_a_stall(
    cluster: Cluster, tmp_path: Path
) -> None:
    writer = VipWriter(cluster, tmp_path, "quick")
    vol = writer.vol["id"]
    try:
        writer.rounds(2, 120, "the writer to complete two rounds")
        before = _extents(cluster.state, vol)
        primaries = [cluster.name_of(r.primary) for r in before.values()]
        victim = max(cluster.chunks, key=primaries.count)
        t0 = time.monotonic()
        lunastor("dev", "stop", victim, "--kill", "--dir", str(cluster.dir))
        lunastor("dev", "start", victim, "--dir", str(cluster.dir))
        back = time.monotonic() - t0
        writer.rounds(2, 120, "two rounds of writes after the restart")
    finally:
        writer.halt()
    journal = writer.journal()
    gap, _ = journal.longest_gap()
    print(
        f"\nquick restart of {victim} (primary of {primaries.count(victim)} of {EXTENTS} "
        f"extents): back {back:.1f} s after the kill; {len(journal.acks)} acknowledged, "
        f"{journal.failed} failed, longest gap {gap:.2f} s, gaps over 0.5 s: {journal.stalls()}"
    )
    assert journal.failed == 0, writer.err.read_text()
    lost = writer.lost(cluster.portal(cluster.chunks[0]), journal, tmp_path)
    assert not lost, f"acknowledged writes lost: {lost}"
