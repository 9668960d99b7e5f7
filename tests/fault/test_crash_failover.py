"""A chunk server SIGKILLed under a libiscsi writer, with a long lease: the crash guard
(lunastor/chunk/guard.py) revokes its lease at once, so the redirector stops offering it and
the survivors take over its extents without waiting for the lease (docs/faults.md, "Crash
guard"). The victim is the primary of the most extents the writer writes (and its session's
server when that is a tie): the extents' ordering moves, and the session with it if it was
there.

With the lease TTL at 8 s, the gap between acknowledgements must stay under 4 s: without the
guard the redirector offers the dead server, and the extents wait, until etcd expires its
lease, 8 s at least. Every acknowledged write is read back through another server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.chunk.test_replicated_cluster import Cluster, _extents
from tests.integration.test_redirector_failover import VipWriter, sessions
from tests.support.devcluster import dev_up, lunastor

LEASE_TTL = 8.0
GAP_BOUND = LEASE_TTL / 2


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    directory = tmp_path / "dev"
    state = dev_up(directory, chunks=3, lease_ttl=LEASE_TTL)
    try:
        yield Cluster(directory, state)
    finally:
        lunastor("dev", "down", "--dir", str(directory), check=False)


def test_sigkill_of_the_access_point_and_primary_resumes_before_the_lease_runs_out(
    cluster: Cluster, tmp_path: Path
) -> None:
    writer = VipWriter(cluster, tmp_path, "crash")
    vol = writer.vol
    admin = {n: cluster.state["daemons"][n]["endpoints"]["admin"] for n in cluster.chunks}
    try:
        writer.rounds(2, 60, "the writer to complete two rounds")
        on = [n for n in cluster.chunks if sessions(admin[n]) >= 1]
        assert len(on) == 1, f"the client's session is on {on}, expected exactly one server"
        # the victim: the primary of the most extents written (the session's server on a tie)
        before = _extents(cluster.state, vol["id"])
        assert len(before) == 4, before
        primaries = [cluster.name_of(r.primary) for r in before.values()]
        victim = max(cluster.chunks, key=lambda n: (primaries.count(n), n == on[0]))
        victim_id = cluster.chunk_id(victim)
        role = f"primary of {primaries.count(victim)} of 4 extents"
        role += ", the session's server" if victim == on[0] else f", the session is on {on[0]}"
        killed_at = time.monotonic()
        lunastor("dev", "stop", victim, "--kill", "--dir", str(cluster.dir))
        survivors = [n for n in cluster.chunks if n != victim]
        writer.rounds(2, 60, "the writer to complete two more rounds after the kill")
        new_home = next(n for n in survivors if sessions(admin[n]) >= 1)
    finally:
        writer.halt()
    journal = writer.journal()
    gap, gap_start = journal.longest_gap()
    after = _extents(cluster.state, vol["id"])
    primaries = sorted({cluster.name_of(r.primary) for r in after.values()})
    print(
        f"\ncrash failover: {victim} ({role}) SIGKILLed (lease TTL {LEASE_TTL:g} s), the "
        f"client resumed on {new_home}; longest gap {gap:.2f} s, from "
        f"{gap_start - killed_at:+.2f} s after the kill started; gaps over 0.5 s: "
        f"{journal.stalls()}; {len(journal.acks)} acknowledged, {journal.failed} failed; "
        f"primaries now {primaries}"
    )
    assert journal.failed == 0, writer.err.read_text()
    assert all(victim_id not in r.replicas for r in after.values())
    assert gap < GAP_BOUND, f"IO gap {gap:.2f} s: the takeover waited for the lease"

    reader = next(n for n in survivors if n != new_home)
    lost = writer.lost(cluster.portal(reader), journal, tmp_path)
    assert not lost, f"acknowledged writes lost: {lost}"
