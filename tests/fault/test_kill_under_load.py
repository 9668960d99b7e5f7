"""A chunk server SIGKILLed under 4 KiB random writes at queue depth 32 (bench/iscsi_load.c,
libiscsi, which reports every failed command to its caller and retries none), as the
bench's catch-up does (bench/rebuild.py), then started again while the writes go on: not
one write may fail. The kill costs the extents a member (a secondary removed, or a failover
where it was the primary), the restart gives it back (a catch-up join, join.py); each is a
generation change under load. A delay is allowed, an error is not.

Found by the bench: 6 WRITEs ended with MEDIUM ERROR / WRITE ERROR in 2 of 3 runs. A primary
removing the dead secondary commits gen + 1 before its primary state adopts it, and a write
of gen + 1 arriving then set up a second primary state over the same replica whose seqs
collided with the first's: the primary's own replica refused writes as `out_of_order`
(docs/faults.md, "Bugs the rounds found"; the deterministic in-process test is
tests/integration/chunk/test_replication.py,
test_a_secondary_dying_under_concurrent_writes_fails_none_of_them).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import iscsi_load
from bench.systems.devcluster import DevCluster
from lunastor.common.etcd import EtcdError
from tests.support.devcluster import dev_up, lunastor

ACCESS_POINT = "chunk1"
VICTIM = "chunk3"
CYCLES = 4
LOAD = iscsi_load.Load(write=True, random=True, block=4096, depth=32)
SIZE = 256 << 20


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DevCluster]:
    # the repair pass brings the victim back quickly (catch-up join) between the cycles
    monkeypatch.setenv("LUNASTOR_REPAIR_INTERVAL", "0.5")
    directory = tmp_path / "dev"
    dev_up(directory, chunks=3, lease_ttl=2.0)
    try:
        yield DevCluster(directory)
    finally:
        lunastor("dev", "down", "--dir", str(directory), check=False)


def _result(proc: subprocess.Popen[str]) -> tuple[iscsi_load.LoadResult, str]:
    """Its result line (it exits 1 when a command failed) and what it said of failures."""
    out, err = proc.communicate(timeout=120)
    return iscsi_load.parse_load_output(out), err


def _rejoined(cluster: DevCluster, volume_id: str, victim: str) -> bool:
    """Every extent names the victim again and none is converging. A read of etcd that
    fails (its connect timing out on a loaded machine) counts as not yet."""
    try:
        extents = cluster.extents(volume_id)
    except EtcdError:
        return False
    return all(victim in e.replicas and not e.converging for e in extents)


def _served(client: Path, url: str) -> None:
    deadline = time.monotonic() + 90  # a fresh cluster on a loaded machine is slow to serve
    while True:
        try:
            iscsi_load.run(client, url, iscsi_load.Load(False, False, 4096, 1), 0.1, 1 << 20)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.timeout(900)
def test_a_chunk_server_sigkilled_under_qd32_writes_fails_none_of_them(
    cluster: DevCluster, tmp_path: Path
) -> None:
    client = iscsi_load.build(tmp_path / "iscsi-load")
    vol = cluster.create_volume("kill-under-load", SIZE, 3)
    url = vol.url(cluster.portal(ACCESS_POINT))
    _served(client, url)
    warm, err = _result(iscsi_load.start(client, url, LOAD, 3, SIZE))  # every extent written
    assert warm.errors == 0, err
    victim = cluster.chunk_id(VICTIM)
    results = []
    for cycle in range(CYCLES):
        # the kill lands with 32 writes in flight; the victim is started again 2 s later and
        # re-joins (a catch-up join: gen + 1 again) while the writes go on
        proc = iscsi_load.start(client, url, LOAD, 24, SIZE)
        time.sleep(2)
        cluster.stop(VICTIM, kill=True)
        time.sleep(2)
        cluster.start(VICTIM)
        deadline = time.monotonic() + 120
        while not _rejoined(cluster, vol.id, victim):
            assert time.monotonic() < deadline, f"cycle {cycle}: {VICTIM} did not catch up"
            time.sleep(0.5)
        rejoined_under_load = proc.poll() is None
        result, err = _result(proc)
        results.append((result, rejoined_under_load))
        assert result.errors == 0, f"cycle {cycle}: {result.errors} writes failed: {err}"
    print(
        f"\n{VICTIM} SIGKILLed {CYCLES} times under QD32 random writes through "
        f"{ACCESS_POINT}, restarted 2 s later: "
        + "; ".join(
            f"{r.ios} writes, {r.errors} failed, re-joined {'before' if under else 'after'} "
            "the load ended"
            for r, under in results
        )
    )
