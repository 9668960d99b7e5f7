"""Snapshots, clones, space reclaim and online expansion in a real dev cluster, through the REST
API (the CLI) and real initiators: qemu-img/qemu-io and libiscsi tools (docs/snapshots.md).

A libiscsi writer (tests/tools/verified_writer.c) keeps overwriting versioned blocks while a
snapshot is taken; the snapshot, read through a clone, must hold for every block a version
between the last one acknowledged before the snapshot request and the last one issued before
its answer, and everything else exactly as written before.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.extent_pages import decode_kv
from lunastor.common.records import ChunkServerStatus, ExtentRecord, Keys, parse_preserved
from tests.integration.chunk.test_replicated_cluster import QEMU_IQN, Cluster, run
from tests.integration.test_redirector_failover import pattern
from tests.support.devcluster import dev_up, lunastor
from tests.support.procs import wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("iscsi-readcapacity16") is None,
    reason="gcc and libiscsi-bin are needed",
)

MIB = 1 << 20
BLOCK = 4096
TOOLS = Path(__file__).resolve().parents[2] / "tools"
WRITER_IQN = "iqn.2026-11.test:snap-writer"
WATCH_IQN = "iqn.2026-11.test:capacity-watch"


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("tools")
    built = {}
    for name in ("verified_writer", "capacity_watch"):
        binary = out / name
        build = run("gcc", "-O2", "-Wall", "-o", str(binary), str(TOOLS / f"{name}.c"), "-liscsi")
        assert build.returncode == 0, build.stderr
        built[name] = binary
    return built


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("snapcluster") / "dev"
    state = dev_up(directory, chunks=3, lease_ttl=2.0)
    try:
        yield Cluster(directory, state)
    finally:
        lunastor("dev", "down", "--dir", str(directory), check=False)


def url(cluster: Cluster, chunk: str, vol: dict[str, Any]) -> str:
    return f"iscsi://{cluster.portal(chunk)}/{vol['target_iqn']}/{vol['lun']}"


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def wait_lun(link: str, initiator: str) -> None:
    wait_for(lambda: run("iscsi-inq", "-i", initiator, link, timeout=20).returncode == 0, 30, link)


def volume(cluster: Cluster, name: str, *args: str, export: tuple[str, ...] = ()) -> dict[str, Any]:
    vol: dict[str, Any] = cluster.cli("volume", "create", name, *args)
    for iqn in export:
        lunastor("export", "add", name, iqn, "--dir", str(cluster.dir))
    return vol


def read_image(link: str, path: Path) -> bytes:
    ok(run("qemu-img", "convert", "-f", "raw", "-O", "raw", link, str(path)))
    return path.read_bytes()


def compare(expected: bytes, link: str, scratch: Path) -> None:
    scratch.write_bytes(expected)
    got = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(scratch), link)
    assert got.returncode == 0, f"{link}: {got.stdout} {got.stderr}"


def used_on_disk(cluster: Cluster) -> int:
    """Bytes allocated to replica files in every chunk server's data directory."""
    total = 0
    for name in cluster.chunks:
        for dirpath, _, names in os.walk(cluster.dir / "data" / name / "extents"):
            for n in names:
                try:
                    total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
                except FileNotFoundError:
                    continue
    return total


def extent_map(cluster: Cluster) -> dict[tuple[str, int], ExtentRecord]:
    """Every extent version in the map, by (store volume, index)."""
    items = etcd_prefix(cluster, Keys.EXTENTS).items()
    return {(r.volume, r.index): r for k, v in items for r, _ in decode_kv(k, v, 0)}


def etcd_prefix(cluster: Cluster, prefix: str) -> dict[str, bytes]:
    async def read() -> dict[str, bytes]:
        etcd_state = cluster.state["etcd"]
        cfg = EtcdConfig(endpoints=etcd_state["endpoints"], namespace=etcd_state["namespace"])
        async with await Etcd.connect(cfg) as etcd:
            kvs, _ = await etcd.get_prefix(prefix)
        return {kv.key: kv.value for kv in kvs}

    return asyncio.run(read())


def reported_used(cluster: Cluster) -> int:
    """What the chunk servers' live records report as used by replicas."""
    total = 0
    for raw in etcd_prefix(cluster, Keys.LIVE_CHUNKS).values():
        total += sum(int(d.get("used", 0)) for d in ChunkServerStatus.from_json(raw).data_dirs)
    return total


@dataclass
class WriterLog:
    issued: list[tuple[float, int, int]] = field(default_factory=list)  # (time, block, version)
    acked: list[tuple[float, int, int]] = field(default_factory=list)
    failed: int = 0

    @classmethod
    def parse(cls, text: str) -> WriterLog:
        log = cls()
        for line in text.splitlines():
            kind, block, version, at = line.split()
            entry = (float(at), int(block), int(version))
            if kind == "I":
                log.issued.append(entry)
            elif kind == "A":
                log.acked.append(entry)
            else:
                log.failed += 1
        return log

    def rounds_acked(self, after: float = 0.0) -> int:
        """Complete rounds whose every write was acknowledged after `after`."""
        versions = {v for t, _, v in self.acked if t > after}
        return max(0, len(versions) - 1)


def start_writer(
    tool: Path, link: str, blocks: int, stride: int, work: Path
) -> subprocess.Popen[str]:
    out = (work / "writer.out").open("w")
    err = (work / "writer.err").open("w")
    return subprocess.Popen(
        [str(tool), link, WRITER_IQN, str(blocks), str(stride), str(work / "stop")],
        stdout=out,
        stderr=err,
        text=True,
    )


def stop_writer(proc: subprocess.Popen[str], work: Path) -> WriterLog:
    (work / "stop").touch()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return WriterLog.parse((work / "writer.out").read_text())


def test_snapshot_and_clones_while_the_volume_keeps_changing(
    cluster: Cluster, tools: dict[str, Path], tmp_path: Path
) -> None:
    blocks, stride, size = 32, 4 * MIB, 128 * MIB  # the writer's blocks span both extents
    baseline = used_on_disk(cluster)
    src = volume(cluster, "src", "--size", "128MiB", export=(QEMU_IQN, WRITER_IQN))
    wait_lun(url(cluster, "chunk1", src), WRITER_IQN)
    before = bytearray(os.urandom(size))
    (tmp_path / "a.raw").write_bytes(before)
    ok(
        run(
            "qemu-img",
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            str(tmp_path / "a.raw"),
            url(cluster, "chunk1", src),
        )
    )

    writer = start_writer(
        tools["verified_writer"], url(cluster, "chunk2", src), blocks, stride, tmp_path
    )
    try:
        wait_for(
            lambda: WriterLog.parse((tmp_path / "writer.out").read_text()).rounds_acked() >= 2,
            60,
            "two rounds of writes",
        )
        t0 = time.monotonic()
        snap = cluster.cli("snapshot", "create", "s1", "src")
        t1 = time.monotonic()
        print(f"snapshot create with a writer running: {(t1 - t0) * 1000:.0f} ms (CLI included)")
        wait_for(
            lambda: WriterLog.parse((tmp_path / "writer.out").read_text()).rounds_acked(t1) >= 2,
            60,
            "two rounds of writes after the snapshot",
        )
    finally:
        log = stop_writer(writer, tmp_path)
    assert log.failed == 0, (tmp_path / "writer.err").read_text()

    # The snapshot, read through a clone: each writer block holds a version the snapshot
    # may hold (acknowledged before it was asked for .. issued before it was answered).
    c1 = volume(
        cluster, "c1", "--size", "128MiB", "--from-snapshot", snap["id"], export=(QEMU_IQN,)
    )
    assert c1["source"] == {"snapshot_id": snap["id"]}
    seen = read_image(url(cluster, "chunk3", c1), tmp_path / "c1.raw")
    expected = bytearray(before)
    for k in range(blocks):
        lo = max((v for t, b, v in log.acked if b == k and t < t0), default=0)
        hi = max((v for t, b, v in log.issued if b == k and t < t1), default=0)
        got = seen[k * stride : k * stride + BLOCK]
        version = next((v for v in range(lo, hi + 1) if v and pattern(k, v) == got), None)
        assert version is not None, f"block {k}: no version in {lo}..{hi} matches the snapshot"
        expected[k * stride : k * stride + BLOCK] = got
    compare(bytes(expected), url(cluster, "chunk1", c1), tmp_path / "expected.raw")

    # The volume went on changing: it holds the writer's last versions, not the snapshot's.
    now = bytearray(read_image(url(cluster, "chunk1", src), tmp_path / "src.raw"))
    last = {b: v for _, b, v in sorted(log.acked)}
    for k in range(blocks):
        assert now[k * stride : k * stride + BLOCK] == pattern(k, last[k])
        assert now[k * stride : k * stride + BLOCK] != expected[k * stride : k * stride + BLOCK]

    # Clone and source diverge independently.
    ok(run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", url(cluster, "chunk2", c1)))
    ok(run("qemu-io", "-f", "raw", "-c", "write -P 0x33 64M 1M", url(cluster, "chunk1", src)))
    expected[0:MIB] = b"\x5a" * MIB
    now[64 * MIB : 65 * MIB] = b"\x33" * MIB
    compare(bytes(expected), url(cluster, "chunk3", c1), tmp_path / "expected.raw")
    compare(bytes(now), url(cluster, "chunk2", src), tmp_path / "expected.raw")

    # A clone of the volume itself (an implicit snapshot) reads as the volume did.
    c2 = volume(cluster, "c2", "--size", "128MiB", "--from-volume", "src", export=(QEMU_IQN,))
    ok(run("qemu-io", "-f", "raw", "-c", "write -P 0x77 100M 4k", url(cluster, "chunk3", src)))
    compare(bytes(now), url(cluster, "chunk2", c2), tmp_path / "expected.raw")
    now[100 * MIB : 100 * MIB + BLOCK] = b"\x77" * BLOCK
    compare(bytes(now), url(cluster, "chunk1", src), tmp_path / "expected.raw")

    # A clone of a clone reads through both: its own source's extent 0, the snapshot's 1.
    c3 = volume(cluster, "c3", "--size", "128MiB", "--from-volume", "c1", export=(QEMU_IQN,))
    ok(run("qemu-io", "-f", "raw", "-c", "write -P 0x66 2M 4k", url(cluster, "chunk1", c1)))
    compare(bytes(expected), url(cluster, "chunk2", c3), tmp_path / "expected.raw")

    # Each replica of a preserved copy was made where the extent lives, never elsewhere.
    extents = extent_map(cluster)
    live = {(r.volume, r.index): r for r in extents.values() if parse_preserved(r.volume) is None}
    for rec in extents.values():
        owner = parse_preserved(rec.volume)
        if owner is not None:
            assert set(rec.replicas) <= set(live[(owner[0], rec.index)].replicas)
        if rec.origin:
            origin = next(
                r for r in extents.values() if r.volume == rec.origin and r.index == rec.index
            )
            assert set(rec.replicas) <= set(origin.replicas)

    # Space reclaim: deleting everything gives every byte back.
    used = used_on_disk(cluster)
    reported = reported_used(cluster)
    for name in ("c3", "c1", "c2"):
        lunastor("volume", "delete", name, "--force", "--dir", str(cluster.dir))
    lunastor("snapshot", "delete", "s1", "--dir", str(cluster.dir))
    lunastor("volume", "delete", "src", "--force", "--dir", str(cluster.dir))
    wait_for(lambda: used_on_disk(cluster) <= baseline, 60, "replica files to be deleted")
    wait_for(lambda: reported_used(cluster) <= baseline, 60, "chunk servers to report it")
    print(
        f"space: {used / MIB:.1f} MiB on disk ({reported / MIB:.1f} MiB reported) before the "
        f"deletes, {used_on_disk(cluster) / MIB:.1f} MiB ({reported_used(cluster) / MIB:.1f} "
        "MiB reported) after"
    )
    assert not etcd_prefix(cluster, Keys.GC_VOLUMES) and not etcd_prefix(cluster, Keys.GC_SNAPSHOTS)


def test_online_expansion_raises_capacity_data_has_changed_on_every_access_point(
    cluster: Cluster, tools: dict[str, Path], tmp_path: Path
) -> None:
    vol = volume(cluster, "grow", "--size", "64MiB", export=(WATCH_IQN,))
    links = [url(cluster, c, vol) for c in ("chunk1", "chunk2")]
    wait_lun(links[0], WATCH_IQN)
    go = tmp_path / "go"
    watchers = [
        subprocess.Popen(
            [str(tools["capacity_watch"]), link, WATCH_IQN, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for link in links
    ]
    try:
        assert watchers[0].stdout is not None and watchers[1].stdout is not None
        for w in watchers:  # both sessions are up before the volume grows
            assert w.stdout is not None
            assert w.stdout.readline().strip() == f"SIZE {64 * MIB}"
        grown = cluster.cli("volume", "expand", "grow", "--size", "192MiB")
        assert grown["size_bytes"] == 192 * MIB
        go.touch()
        for w in watchers:
            out, err = w.communicate(timeout=60)
            assert w.returncode == 0, err
            lines = out.split("\n")
            # UNIT ATTENTION, CAPACITY DATA HAS CHANGED (2Ah/09h), then the new size
            assert "SENSE 6 2a 09" in lines, out
            assert f"SIZE {192 * MIB}" in lines, out
    finally:
        for w in watchers:
            if w.poll() is None:
                w.send_signal(signal.SIGKILL)
                w.wait()
    for link in links:  # new sessions see the new size too
        out = ok(run("iscsi-readcapacity16", "-i", WATCH_IQN, link))
        assert f"RETURNED LOGICAL BLOCK ADDRESS:{192 * MIB // 512 - 1}" in out
    lunastor("volume", "delete", "grow", "--force", "--dir", str(cluster.dir))


def store_files(cluster: Cluster, chunk: str) -> set[tuple[str, int]]:
    root = cluster.dir / "data" / chunk / "extents"
    return {(p.parent.name, int(p.stem, 16)) for p in root.glob("*/*.hdr")}


def test_gc_killed_midway_frees_everything_unreferenced_and_nothing_referenced(
    cluster: Cluster, tmp_path: Path
) -> None:
    n = 40  # one 4 KiB write per 64 MiB extent: many extents, little data
    # 16 versions a pass (the default frees all 80 in one), so that a kill lands midway; not
    # fewer: each pass waits planner_interval (5 s), and the GC has to finish after the restart
    config = cluster.dir / "config" / "meta.toml"
    default = config.read_text()
    config.write_text("gc_batch = 16\n" + default)  # a top-level key: before any [table]
    lunastor("dev", "stop", "meta", "--dir", str(cluster.dir))
    lunastor("dev", "start", "meta", "--dir", str(cluster.dir))
    size = f"{n * 64}MiB"
    pinned = volume(cluster, "pinned", "--size", size, export=(QEMU_IQN,))
    doomed = volume(cluster, "doomed", "--size", size, export=(QEMU_IQN,))

    def write_all(vol: dict[str, Any], value: int) -> None:
        cmds = [a for k in range(n) for a in ("-c", f"write -P {value + k} {k * 64}M 4k")]
        ok(run("qemu-io", "-f", "raw", *cmds, url(cluster, "chunk1", vol)))

    write_all(pinned, 1)
    write_all(doomed, 1)
    cluster.cli("snapshot", "create", "sp", "pinned")
    later = cluster.cli("snapshot", "create", "sp2", "pinned")  # no write in between
    write_all(pinned, 100)  # every extent is copied aside for the snapshots first, once
    clone = volume(
        cluster, "cp", "--size", size, "--from-snapshot", later["id"], export=(QEMU_IQN,)
    )

    def clone_reads_the_snapshot() -> None:
        cmds = [a for k in range(n) for a in ("-c", f"read -P {1 + k} {k * 64}M 4k")]
        cmds += ["-c", "read -P 0 4k 60k", "-c", f"read -P 0 {(n - 1) * 64 + 1}M 1M"]
        out = ok(run("qemu-io", "-f", "raw", *cmds, url(cluster, "chunk2", clone)))
        assert "verification failed" not in out, out

    clone_reads_the_snapshot()

    def versions() -> dict[tuple[str, int], ExtentRecord]:
        return extent_map(cluster)

    def garbage_left() -> int:
        return sum(1 for r in versions().values() if r.volume in (pinned["id"], doomed["id"]))

    assert garbage_left() == 2 * n
    preserved = {k for k, r in versions().items() if r.volume == f"{pinned['id']}.e0"}
    assert len(preserved) == n  # one copy per extent, shared by both snapshots

    # chunk3 is down while the collector hands out its work: it must pick it up on restart
    lunastor("dev", "stop", "chunk3", "--kill", "--dir", str(cluster.dir))
    for name in ("sp", "sp2"):
        lunastor("snapshot", "delete", name, "--dir", str(cluster.dir))
    for name in ("pinned", "doomed"):
        lunastor("volume", "delete", name, "--force", "--dir", str(cluster.dir))
    midway = wait_for(lambda: 0 < (g := garbage_left()) < 2 * n and g, 60, "GC to start")
    lunastor("dev", "stop", "meta", "--kill", "--dir", str(cluster.dir))  # SIGKILL mid-GC
    print(f"meta killed with {midway} of {2 * n} unreferenced extent versions left")
    assert garbage_left() > 0, "GC finished before the kill: the test proves nothing"
    lunastor("dev", "start", "meta", "--dir", str(cluster.dir))
    wait_for(lambda: garbage_left() == 0, 180, "GC to finish after the restart")

    # Nothing still referenced was freed: the clone's copies, and the clone reads the same.
    now = versions()
    assert preserved <= set(now), "a preserved copy the clone reads was freed"
    assert Keys.gc_volume(pinned["id"]) in etcd_prefix(cluster, Keys.GC_VOLUMES)  # still pinned
    assert Keys.gc_volume(doomed["id"]) not in etcd_prefix(cluster, Keys.GC_VOLUMES)
    assert not etcd_prefix(cluster, Keys.GC_SNAPSHOTS)
    clone_reads_the_snapshot()

    lunastor("dev", "start", "chunk3", "--dir", str(cluster.dir))
    wait_for(lambda: not etcd_prefix(cluster, Keys.GC_REPLICAS), 60, "every chunk's GC work done")
    # The files on disk are exactly what the map still names: as a member, or as a former
    # member that may still hold files (chunk3 was removed from replica sets while it was
    # down, so the GC gave it work items for the extents it freed meanwhile).
    for chunk in cluster.chunks:
        me = cluster.chunk_id(chunk)
        named = {k for k, r in versions().items() if me in r.replicas or me in r.strays}
        assert store_files(cluster, chunk) == named, chunk

    config.write_text(default)  # the default from here on, for this module's other tests too
    lunastor("dev", "stop", "meta", "--dir", str(cluster.dir))
    lunastor("dev", "start", "meta", "--dir", str(cluster.dir))
    lunastor("volume", "delete", "cp", "--force", "--dir", str(cluster.dir))
    wait_for(lambda: not versions() and not etcd_prefix(cluster, Keys.GC_VOLUMES), 60, "all freed")
    wait_for(lambda: not etcd_prefix(cluster, Keys.GC_REPLICAS), 60, "all files deleted")
    for chunk in cluster.chunks:
        assert store_files(cluster, chunk) == set(), chunk


def test_copy_on_write_with_a_chunk_server_down(cluster: Cluster, tmp_path: Path) -> None:
    """A member that is down when an extent is preserved is left out of the copy (and out of
    the extent); a dead primary is replaced first. The snapshot still reads back exactly."""
    vol = volume(cluster, "degraded", "--size", "256MiB", export=(QEMU_IQN,))
    image = bytearray(os.urandom(256 * MIB))
    (tmp_path / "img.raw").write_bytes(image)
    ok(
        run(
            "qemu-img",
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            str(tmp_path / "img.raw"),
            url(cluster, "chunk1", vol),
        )
    )
    snap = cluster.cli("snapshot", "create", "ds", "degraded")
    lunastor("dev", "stop", "chunk3", "--kill", "--dir", str(cluster.dir))
    dead = cluster.chunk_id("chunk3")
    try:
        cmds = [a for k in range(4) for a in ("-c", f"write -P 0x{k + 1}{k + 1} {k * 64 + 8}M 64k")]
        ok(run("qemu-io", "-f", "raw", *cmds, url(cluster, "chunk1", vol), timeout=300))
        recs = list(extent_map(cluster).values())
        kept = [r for r in recs if r.volume == f"{vol['id']}.e0"]
        assert len(kept) == 4 and all(dead not in r.replicas and r.replicas for r in kept), kept
        clone = volume(
            cluster, "dc", "--size", "256MiB", "--from-snapshot", snap["id"], export=(QEMU_IQN,)
        )
        compare(bytes(image), url(cluster, "chunk2", clone), tmp_path / "expected.raw")
        for k in range(4):
            image[k * 64 * MIB + 8 * MIB : k * 64 * MIB + 8 * MIB + 65536] = (
                bytes([(k + 1) * 17]) * 65536
            )
        compare(bytes(image), url(cluster, "chunk2", vol), tmp_path / "expected.raw")
    finally:
        lunastor("dev", "start", "chunk3", "--dir", str(cluster.dir))
    # A clone of a volume that is then deleted: it reads the deleted volume's extents, which
    # the garbage collector keeps for it (planner passes run meanwhile).
    dv = volume(cluster, "dv", "--size", "256MiB", "--from-volume", "degraded", export=(QEMU_IQN,))
    lunastor("volume", "delete", "dc", "--force", "--dir", str(cluster.dir))
    lunastor("snapshot", "delete", "ds", "--dir", str(cluster.dir))
    lunastor("volume", "delete", "degraded", "--force", "--dir", str(cluster.dir))
    wait_for(lambda: not etcd_prefix(cluster, Keys.GC_SNAPSHOTS), 60, "a GC pass")
    compare(bytes(image), url(cluster, "chunk3", dv), tmp_path / "expected.raw")
    lunastor("volume", "delete", "dv", "--force", "--dir", str(cluster.dir))
    wait_for(lambda: not etcd_prefix(cluster, Keys.EXTENTS), 60, "everything freed")
