"""Background scrub (issue 6): bad blocks planted in replica files are found, repaired from a
good member, counted, and shown as a `scrub` operation.

First with the in-process cluster of test_replication.py (real etcd, real data ports; passes
forced with `run_once`), then in a live dev cluster (chunk servers as processes, scrubbing on
their own every `scrub_interval`).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from lunastor.chunk.maintenance.scrub import Scrubber
from lunastor.chunk.store import BLOCK_SIZE
from lunastor.chunk.wire.messages import Copy, Status
from lunastor.common.records import Keys, OperationRecord, ScrubErrorsRecord
from tests.integration.chunk.test_replicated_cluster import QEMU_IQN, Cluster, _extents, run
from tests.integration.chunk.test_replication import EXTENT, blocks
from tests.integration.chunk.test_replication import Cluster as LocalCluster
from tests.integration.chunk.test_replication import cluster as cluster
from tests.support.devcluster import dev_up, lunastor
from tests.support.procs import wait_for

MIB = 1 << 20


def flip(path: Path, offset: int) -> None:
    """Invert one byte of a file in place (through the page cache, as a bad disk would)."""
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_scrub_repairs_planted_bad_blocks_and_records_its_pass(
    cluster: LocalCluster,
) -> None:
    v = cluster.volume("chunk-0", size=4 * EXTENT)
    await v.write(0, blocks(7, 4 * EXTENT // 512), fua=True)
    # one bad block per (server, extent), never the same block on two servers
    planted = []
    for i, n in enumerate(cluster.nodes.values()):
        for extent in range(4):
            replica = await n.store.open("vol-t", extent)
            block = 10 + i * 50 + extent
            flip(replica.paths.data, block * BLOCK_SIZE + 100)
            planted.append((n.id, extent, block))
    found0, repaired0 = (
        counter("lunastor_scrub_errors_total"),
        counter("lunastor_scrub_repairs_total"),
    )
    results = {}
    for n in cluster.nodes.values():
        scrub = Scrubber(
            n.store, n.emap, n.replicas.call, n.id, etcd=cluster.etcd, rate=0, interval=0
        )
        results[n.id] = await scrub.run_once()
    found = sorted((node, e, b) for node, r in results.items() for _, e, b in r.bad)
    assert found == sorted(planted)
    assert sum(r.repaired for r in results.values()) == len(planted)
    assert counter("lunastor_scrub_errors_total") - found0 == len(planted)
    assert counter("lunastor_scrub_repairs_total") - repaired0 == len(planted)
    for extent in range(4):
        arrays = set()
        for n in cluster.nodes.values():
            replica = await n.store.open("vol-t", extent)
            arrays.add(hashlib.sha256(replica.paths.data.read_bytes()).digest())
        assert len(arrays) == 1, f"extent {extent}: replicas differ after the scrub"
    assert await v.read(0, 4 * EXTENT // 512) == blocks(7, 4 * EXTENT // 512)
    again = await Scrubber(
        cluster.nodes["chunk-1"].store,
        cluster.nodes["chunk-1"].emap,
        cluster.nodes["chunk-1"].replicas.call,
        "chunk-1",
        etcd=cluster.etcd,
        rate=0,
        interval=0,
    ).run_once()
    assert again.bad == [] and again.replicas == 4
    kv = await cluster.etcd.get(Keys.operation("scrub-chunk-1"))
    assert kv is not None
    op = OperationRecord.from_json(kv.value)
    assert (op.kind, op.subject, op.state, op.progress) == ("scrub", "chunk-1", "succeeded", 1.0)


async def test_blocks_bad_on_every_member_are_recorded_until_a_pass_finds_them_good(
    cluster: LocalCluster,
) -> None:
    """The same block bad on all three members: no good copy to repair from. Each server's
    pass records it under its scrub-errors key (meta turns that into the volume condition);
    once a write replaces the block, the next pass deletes the key."""
    v = cluster.volume("chunk-0", size=EXTENT)
    await v.write(0, blocks(3, EXTENT // 512), fua=True)
    for n in cluster.nodes.values():
        flip((await n.store.open("vol-t", 0)).paths.data, 5 * BLOCK_SIZE + 7)

    def scrubber(n: Any) -> Scrubber:
        return Scrubber(
            n.store, n.emap, n.replicas.call, n.id, etcd=cluster.etcd, rate=0, interval=0
        )

    for n in cluster.nodes.values():
        result = await scrubber(n).run_once()
        assert result.unrepaired == [("vol-t", 0, 5)] and result.repaired == 0
        kv = await cluster.etcd.get(Keys.scrub_errors(n.id))
        assert kv is not None
        rec = ScrubErrorsRecord.from_json(kv.value)
        assert (rec.chunk_id, rec.blocks, rec.more) == (n.id, [["vol-t", 0, 5]], 0)
    await v.write(5 * BLOCK_SIZE // 512, blocks(4, BLOCK_SIZE // 512), fua=True)
    for n in cluster.nodes.values():
        assert (await scrubber(n).run_once()).bad == []
        assert await cluster.etcd.get(Keys.scrub_errors(n.id)) is None


async def test_a_repair_never_undoes_a_write_that_raced_with_it(
    cluster: LocalCluster,
) -> None:
    v = cluster.volume("chunk-0", size=EXTENT)
    await v.write(0, blocks(1, 8), fua=False)
    replica = await cluster.nodes["chunk-1"].store.open("vol-t", 0)
    seq = replica.applied_seq
    stale_data, stale_sums = await replica.read_for_copy(0, BLOCK_SIZE)
    await v.write(0, blocks(2, 8), fua=False)  # the write lands between read and copy
    applied = await replica.apply_copy(0, stale_data, stale_sums, if_applied=seq)
    assert applied is False
    # the same over the data port (read repair's copy): refused as out of order
    resp = await cluster.nodes["chunk-0"].replicas.call(
        "chunk-1",
        lambda i: Copy(
            i,
            "vol-t",
            0,
            replica.generation,
            0,
            BLOCK_SIZE,
            stale_data,
            stale_sums,
            if_applied=seq,
        ),
    )
    assert resp.status is Status.OUT_OF_ORDER and resp.fields["expected"] == seq + 1
    assert await v.read(0, 8) == blocks(2, 8)
    checksums = {await (await n.store.open("vol-t", 0)).checksums() for n in cluster.nodes.values()}
    assert len(checksums) == 1


# -- a live cluster ------------------------------------------------------------------------------


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    monkeypatch.setenv("LUNASTOR_EXTENT_SIZE", str(4 * MIB))
    monkeypatch.setenv("LUNASTOR_SCRUB_INTERVAL", "1")
    monkeypatch.setenv("LUNASTOR_SCRUB_RATE", str(64 * MIB))
    directory = tmp_path / "dev"
    state = dev_up(directory, chunks=3, lease_ttl=2.0)
    try:
        yield Cluster(directory, state)
    finally:
        lunastor("dev", "down", "--dir", str(directory), check=False)


def _metric(admin: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_scrub_in_a_live_cluster_finds_and_repairs_every_flipped_byte(
    live: Cluster, tmp_path: Path
) -> None:
    vol = live.create_exported_volume("scrubbed", "16MiB", QEMU_IQN)
    url = f"iscsi://{live.portal(live.chunks[0])}/{vol['target_iqn']}/{vol['lun']}"
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(16 * MIB))
    wait_for(lambda: run("iscsi-inq", "-i", QEMU_IQN, url).returncode == 0, 30, "the LUN")
    conv = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), url)
    assert conv.returncode == 0, conv.stderr
    extents = _extents(live.state, vol["id"])
    assert len(extents) == 4 and all(len(e.replicas) == 3 for e in extents.values())
    admin = {n: live.state["daemons"][n]["endpoints"]["admin"] for n in live.chunks}
    before = {n: _metric(admin[n], "lunastor_scrub_repairs_total") for n in live.chunks}
    # several flipped bytes per server, in different blocks of different extents
    rng = random.Random(5)
    planted: dict[str, int] = {}
    used: set[tuple[int, int]] = set()
    for name in live.chunks:
        for extent in range(4):
            block = rng.randrange(4 * MIB // BLOCK_SIZE)
            while (extent, block) in used:
                block = rng.randrange(4 * MIB // BLOCK_SIZE)
            used.add((extent, block))
            base = live.dir / "data" / name / "extents" / vol["id"] / f"{extent:016x}"
            flip(base.with_suffix(".dat"), block * BLOCK_SIZE + rng.randrange(BLOCK_SIZE))
            planted[name] = planted.get(name, 0) + 1

    def repaired() -> bool:
        got = {n: _metric(admin[n], "lunastor_scrub_repairs_total") - before[n] for n in admin}
        return got == planted

    wait_for(repaired, 60, f"every server to repair its planted blocks {planted}")
    for name in live.chunks:
        assert _metric(admin[name], "lunastor_scrub_errors_total") >= planted[name]
        assert _metric(admin[name], "lunastor_scrub_passes_total") >= 1
    for extent in range(4):
        digests = {
            hashlib.sha256(
                (live.dir / "data" / n / "extents" / vol["id"] / f"{extent:016x}.dat").read_bytes()
            ).digest()
            for n in live.chunks
        }
        assert len(digests) == 1, f"extent {extent}: replica files differ after the scrub"
        data = live.dir / "data" / live.chunks[0] / "extents" / vol["id"] / f"{extent:016x}.dat"
        assert data.read_bytes() == image.read_bytes()[extent * 4 * MIB : (extent + 1) * 4 * MIB]
    ops = live.cli("cluster", "operations")
    items = ops["items"] if isinstance(ops, dict) else ops
    scrubs = {o["subject"] for o in items if o["kind"] == "scrub"}
    assert scrubs == {live.chunk_id(n) for n in live.chunks}, items
