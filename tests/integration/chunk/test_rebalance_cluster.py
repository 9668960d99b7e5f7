"""Rebalancing in a real dev cluster (`lunastor dev up`): three chunk servers hold a volume,
two more join while a verified writer (tests/tools/verified_writer.c) keeps writing; meta's
planner rebuilds the ring and hands out moves that the extents' primaries carry out (join,
then retire) until every server is within 5% of its fair share; then one server is drained
and removed. No acknowledged write is lost (docs/placement.md, "Rebalancing")."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.records import Keys
from lunastor.common.ring import Ring
from lunastor.meta.placement import replica_count_by_server
from tests.integration.chunk.test_replicated_cluster import (
    QEMU_IQN,
    Cluster,
    _extents,
    _target_url,
    _wait_lun,
    run,
)
from tests.integration.test_redirector_failover import Journal, pattern, stop_writer
from tests.support.devcluster import dev_up, lunastor
from tests.support.procs import wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("qemu-img") is None,
    reason="gcc and qemu-img are needed",
)
TOOL = Path(__file__).resolve().parents[2] / "tools" / "verified_writer.c"
INITIATOR = "iqn.2026-11.org.example:rebalance-client"
MIB = 1 << 20
EXTENT = MIB  # small extents: enough of them for a 5% balance to mean something
EXTENTS = 48
VOLUME = EXTENTS * EXTENT
BLOCK = 4096
STRIDE = EXTENT  # one writer block per extent: every move copies under writes
GOAL = 0.05


def stored_ring(c: Cluster) -> Ring:
    async def read() -> Ring:
        etcd_state = c.state["etcd"]
        cfg = EtcdConfig(endpoints=etcd_state["endpoints"], namespace=etcd_state["namespace"])
        async with await Etcd.connect(cfg) as etcd:
            kv = await etcd.get(Keys.ring(3))
        assert kv is not None
        return Ring.from_dict(json.loads(kv.value))

    return asyncio.run(read())


def shares(c: Cluster, volume_id: str, fair: dict[str, float]) -> dict[str, float]:
    """Each server's replica count against its fair share: (count - fair) / fair."""
    counts = Counter(m for e in _extents(c.state, volume_id).values() for m in e.replicas)
    return {m: counts.get(m, 0) / f - 1 for m, f in fair.items()}


def test_three_servers_grow_to_five_and_rebalance_under_writes_then_one_is_drained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LUNASTOR_EXTENT_SIZE", str(EXTENT))
    monkeypatch.setenv("LUNASTOR_REPAIR_INTERVAL", "0.5")
    monkeypatch.setenv("LUNASTOR_PLANNER_INTERVAL", "0.5")
    directory = tmp_path / "dev"
    c = Cluster(directory, dev_up(directory, chunks=5, lease_ttl=2.0))
    try:
        # the two newcomers are stopped before anything is allocated: the ring is built on
        # the first three
        for name in c.chunks[3:]:
            lunastor("dev", "stop", name, "--dir", str(c.dir))
        _grow_and_drain(c, tmp_path)
    finally:
        lunastor("dev", "down", "--dir", str(directory), check=False)


def _grow_and_drain(c: Cluster, tmp_path: Path) -> None:
    writer = tmp_path / "verified-writer"
    build = run("gcc", "-O2", "-Wall", "-o", str(writer), str(TOOL), "-liscsi")
    assert build.returncode == 0, build.stderr
    vol = c.create_exported_volume("grown", f"{VOLUME // MIB}MiB", QEMU_IQN, INITIATOR)
    ap = c.chunks[0]
    url = _target_url(c.portal(ap), vol["target_iqn"], vol["lun"])
    _wait_lun(url, QEMU_IQN)
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(VOLUME))
    conv = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), url)
    assert conv.returncode == 0, conv.stderr
    ids = [c.chunk_id(n) for n in c.chunks]
    old, new = ids[:3], ids[3:]
    before = _extents(c.state, vol["id"])
    assert len(before) == EXTENTS
    assert all(set(e.replicas) == set(old) for e in before.values())

    out, err, stop = tmp_path / "writer.out", tmp_path / "writer.err", tmp_path / "stop"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [str(writer), url, INITIATOR, str(EXTENTS), str(STRIDE), str(stop)],
            stdout=stdout,
            stderr=stderr,
        )
    try:

        def acks() -> int:
            return sum(line.startswith("A ") for line in out.read_text().splitlines())

        wait_for(lambda: acks() >= EXTENTS, 60, "the writer to complete a round")

        # 1. grow: two servers join; the ring is rebuilt and replicas move onto them
        for name in c.chunks[3:]:
            lunastor("dev", "start", name, "--dir", str(c.dir))

        # `dev up` puts chunk1..5 in zones 1, 2, 3, 1, 2 and 3 replicas span 3 zones: chunk3,
        # alone in zone3, holds a replica of every extent; zones 1 and 2 split theirs in two
        zones = [1, 2, 3, 1, 2]
        fair = {i: EXTENTS * (1.0 if z == 3 else 0.5) for i, z in zip(ids, zones, strict=True)}

        def balanced() -> bool:
            return all(abs(d) <= GOAL for d in shares(c, vol["id"], fair).values())

        wait_for(balanced, 180, "every server within 5% of its fair share")

        def rebalance_op() -> dict[str, object] | None:
            ops = c.cli("cluster", "operations")
            return next((o for o in ops if o["kind"] == "rebalance"), None)

        wait_for(
            lambda: (op := rebalance_op()) is not None and op["state"] == "succeeded",
            60,
            "the rebalance operation to succeed",
        )
        op = rebalance_op()
        assert op is not None and op["progress"] == 1.0
        grown = shares(c, vol["id"], fair)
        assert all(abs(d) <= GOAL for d in grown.values()), grown
        after = _extents(c.state, vol["id"])
        assert all(len(e.replicas) == 3 and not e.converging for e in after.values())
        ring = stored_ring(c)
        held = replica_count_by_server(ring)
        assert ring.version > 1 and all(held[n] > 0 for n in new), held
        acked = acks()
        wait_for(lambda: acks() >= acked + EXTENTS, 60, "a round of writes after the moves")

        # 2. drain one of the original servers (not the access point), then remove it
        victim = c.chunks[1]
        victim_id = c.chunk_id(victim)
        drain = c.cli("chunk", "drain", victim_id, "--wait", "--timeout", "150")
        assert (drain["state"], drain["progress"]) == ("succeeded", 1.0), drain
        drained = _extents(c.state, vol["id"])
        assert all(len(e.replicas) == 3 and victim_id not in e.replicas for e in drained.values())
        lunastor("dev", "stop", victim, "--dir", str(c.dir))
        c.cli("chunk", "remove", victim_id)
        listed = [s["id"] for s in c.cli("chunk", "list")]
        assert victim_id not in listed
        acked = acks()
        wait_for(lambda: acks() >= acked + EXTENTS, 60, "a round of writes after the drain")
    finally:
        stop_writer(proc, stop)
    assert proc.returncode == 0, err.read_text()
    journal = Journal.parse(out.read_text())
    print(
        f"\nrebalance: 3 -> 5 servers, shares after the moves "
        f"{ {k[-4:]: round(v, 3) for k, v in grown.items()} }; {len(journal.acks)} writes "
        f"acknowledged, {journal.failed} failed; longest gap {journal.longest_gap()[0]:.2f} s"
    )

    # nothing acknowledged is lost: the writer's blocks, the rest as written by qemu-img
    back = tmp_path / "after.raw"
    read_url = _target_url(c.portal(c.chunks[4]), vol["target_iqn"], vol["lun"])
    conv = run("qemu-img", "convert", "-f", "raw", "-O", "raw", read_url, str(back))
    assert conv.returncode == 0, conv.stderr
    data = bytearray(back.read_bytes())
    expected = bytearray(image.read_bytes())
    lost_writes = []
    for b, v in journal.acked().items():
        got = bytes(data[b * STRIDE : b * STRIDE + BLOCK])
        allowed = {pattern(b, v)} | {pattern(b, w) for w in journal.issued[b] if w > v}
        if got not in allowed:
            lost_writes.append((b, v))
        data[b * STRIDE : b * STRIDE + BLOCK] = expected[b * STRIDE : b * STRIDE + BLOCK]
    assert not lost_writes, f"acknowledged writes lost: {lost_writes}"
    assert data == expected, "data outside the writer's blocks changed"
