"""Re-replication in a real dev cluster (`lunastor dev up`, four chunk servers, three replicas):
a chunk server holding data is SIGKILLed and not restarted while a verified writer
(tests/tools/verified_writer.c) keeps writing through another one. Every extent gets back to
three replicas on the survivors, byte-identical, the `rebuild` operation succeeds with
progress 1.0, and no acknowledged write is lost (docs/datapath.md, "Rebuild, catch-up and
drain")."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

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
INITIATOR = "iqn.2026-11.org.example:rebuild-client"
MIB = 1 << 20
EXTENT = 64 * MIB
VOLUME = 2 * EXTENT
BLOCK = 4096
BLOCKS = 32
STRIDE = VOLUME // BLOCKS
REPLACE_AFTER = 20.0


def copied_bytes(admin: str) -> float:
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    match = re.search(r"^lunastor_rebuild_bytes_total ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_sigkilled_chunk_server_is_rebuilt_on_the_survivors_while_writes_continue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Phase 1's member must be back before replace_after, or it is replaced, not caught up (a
    # restart takes up to ~10 s here)
    monkeypatch.setenv("LUNASTOR_REPLACE_AFTER", str(REPLACE_AFTER))
    monkeypatch.setenv("LUNASTOR_REPAIR_INTERVAL", "0.5")
    monkeypatch.setenv("LUNASTOR_PLANNER_INTERVAL", "0.5")
    # the bytes copied are measured exactly: no rebalancing move may copy an extent meanwhile
    # (4 servers in zones 1, 2, 3, 1 hold 2 extents; rebalancing is tested on its own in
    # test_rebalance_cluster.py)
    monkeypatch.setenv("LUNASTOR_REBALANCE_MAX_MOVES", "0")
    directory = tmp_path / "dev"
    c = Cluster(directory, dev_up(directory, chunks=4, lease_ttl=2.0))
    try:
        _rebuild_under_writes(c, tmp_path)
    finally:
        lunastor("dev", "down", "--dir", str(directory), check=False)


def _rebuild_under_writes(c: Cluster, tmp_path: Path) -> None:
    writer = tmp_path / "verified-writer"
    build = run("gcc", "-O2", "-Wall", "-o", str(writer), str(TOOL), "-liscsi")
    assert build.returncode == 0, build.stderr
    vol = c.create_exported_volume("rebuilt", f"{VOLUME // MIB}MiB", QEMU_IQN, INITIATOR)
    ap = c.chunks[0]  # the access point; never killed
    url = _target_url(c.portal(ap), vol["target_iqn"], vol["lun"])
    _wait_lun(url, QEMU_IQN)
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(VOLUME))
    conv = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), url)
    assert conv.returncode == 0, conv.stderr

    admin = {n: c.state["daemons"][n]["endpoints"]["admin"] for n in c.chunks}
    ap_id = c.chunk_id(ap)

    # Locality (docs/datapath.md) moves each extent's primary to the access point that writes
    # it: a join of the access point (a 4th member for a moment, then a retire) and a
    # hand-over. Until both extents are there, a locality join could run during the catch-up
    # below and count a whole extent's copy as catch-up (a run under load met that).
    def settled() -> bool:
        found = _extents(c.state, vol["id"])
        return sorted(found) == [0, 1] and all(
            len(e.replicas) == 3 and e.replicas[0] == ap_id and not e.converging
            for e in found.values()
        )

    out, err, stop = tmp_path / "writer.out", tmp_path / "writer.err", tmp_path / "stop"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [str(writer), url, INITIATOR, str(BLOCKS), str(STRIDE), str(stop)],
            stdout=stdout,
            stderr=stderr,
        )
    try:

        def acks() -> int:
            return sum(line.startswith("A ") for line in out.read_text().splitlines())

        wait_for(lambda: acks() >= BLOCKS, 60, "the writer to complete a round")
        wait_for(settled, 90, "both extents with 3 replicas, their primary the access point")
        extents = _extents(c.state, vol["id"])

        # 1. catch-up: a member is killed, dropped by the writes, and back before replace_after
        both = [m for m in extents[0].replicas if m in extents[1].replicas and m != ap_id]
        away = c.name_of(both[0] if both else next(iter(set(extents[0].replicas) - {ap_id})))
        away_id = c.chunk_id(away)
        others = [n for n in c.chunks if n != away]
        before = sum(copied_bytes(admin[n]) for n in others)
        away_at = time.monotonic()
        lunastor("dev", "stop", away, "--kill", "--dir", str(c.dir))
        held = [i for i, e in extents.items() if away_id in e.replicas]
        wait_for(
            lambda: all(away_id not in e.replicas for e in _extents(c.state, vol["id"]).values()),
            30,
            f"the writes to drop {away}",
        )
        acked = acks()
        wait_for(lambda: acks() >= acked + BLOCKS, 60, "a round of writes while it is away")
        lunastor("dev", "start", away, "--dir", str(c.dir))
        away_for = time.monotonic() - away_at
        assert away_for < REPLACE_AFTER, f"{away} was away {away_for:.1f} s: it is replaced"

        def caught_up() -> bool:
            now = _extents(c.state, vol["id"])
            return all(away_id in now[i].replicas and not now[i].converging for i in held)

        try:
            wait_for(caught_up, 60, f"{away} to catch up")
        except TimeoutError as exc:
            now = {i: (e.replicas, e.converging) for i, e in _extents(c.state, vol["id"]).items()}
            raise AssertionError(f"{exc}; away {away_for:.1f} s; extents now {now}") from None
        catch_up = sum(copied_bytes(admin[n]) for n in others) - before
        print(
            f"\ncatch-up: {away} away {away_for:.1f} s, rejoined {len(held)} extents of "
            f"{EXTENT // MIB} MiB with "
            f"{catch_up / 1024:.0f} KiB copied (the writer's {BLOCKS} blocks: "
            f"{BLOCKS * BLOCK // 1024} KiB)"
        )
        assert 0 < catch_up <= BLOCKS * BLOCK, "more than the changed blocks was copied"

        # 2. rebuild: another member is killed for good and replaced after replace_after
        extents = _extents(c.state, vol["id"])
        holders = {m for e in extents.values() for m in e.replicas} - {ap_id, away_id}
        victim = c.name_of(sorted(holders)[0])
        lost = c.chunk_id(victim)
        survivors = [n for n in c.chunks if n != victim]
        copied0 = sum(copied_bytes(admin[n]) for n in survivors)
        killed_at = time.monotonic()
        lunastor("dev", "stop", victim, "--kill", "--dir", str(c.dir))

        def restored() -> bool:
            now = _extents(c.state, vol["id"])
            return all(
                len(e.replicas) == 3 and lost not in e.replicas and not e.converging
                for e in now.values()
            )

        wait_for(restored, 150, "every extent back to three replicas")
        elapsed = time.monotonic() - killed_at
        copied = sum(copied_bytes(admin[n]) for n in survivors) - copied0

        def rebuild_op() -> dict[str, object] | None:
            ops = c.cli("cluster", "operations")
            return next((o for o in ops if o["kind"] == "rebuild" and o["subject"] == lost), None)

        wait_for(
            lambda: (op := rebuild_op()) is not None and op["state"] == "succeeded",
            30,
            "the rebuild operation to succeed",
        )
        op = rebuild_op()
        assert op is not None and op["progress"] == 1.0

        # 3. drain: the lost server returns as a spare (with stale files), and the server that
        # caught up is drained through the CLI while the writes go on
        lunastor("dev", "start", victim, "--dir", str(c.dir))
        drained_at = time.monotonic()
        drain = c.cli("chunk", "drain", away_id, "--wait", "--timeout", "100")
        drain_took = time.monotonic() - drained_at
        assert (drain["state"], drain["progress"]) == ("succeeded", 1.0), drain
        after = _extents(c.state, vol["id"])
        assert all(len(e.replicas) == 3 and away_id not in e.replicas for e in after.values())
        left = list((c.dir / "data" / away / "extents" / vol["id"]).glob("*.hdr"))
        assert not left, f"replicas left on the drained server: {left}"
        acked_then = acks()
        wait_for(lambda: acks() >= acked_then + BLOCKS, 60, "a round of writes after it")
    finally:
        stop_writer(proc, stop)
    assert proc.returncode == 0, err.read_text()
    journal = Journal.parse(out.read_text())
    joins = [
        (int(m.group(1)), float(m.group(2)))
        for n in survivors
        for m in re.finditer(
            r"(\d+) bytes copied in \d+ passes, ([0-9.]+) s",
            (c.dir / "logs" / f"{n}.log").read_text(),
        )
    ]
    rates = [f"{b / MIB / max(t, 0.001):.0f}" for b, t in joins if b >= EXTENT // 2]
    print(
        f"\nrebuild: joins copied at {', '.join(rates)} MB/s each (rebuild_rate 64 MiB/s);"
        f"\nrebuild: {victim} SIGKILLed; {copied / MIB:.0f} MiB copied, every extent back to 3 "
        f"replicas {elapsed:.1f} s after the kill ({copied / MIB / elapsed:.1f} MB/s including "
        f"the lease expiry, failover and replace_after); {len(journal.acks)} writes "
        f"acknowledged, {journal.failed} failed; longest gap {journal.longest_gap()[0]:.2f} s"
        f"\ndrain of {away} ({len(held)} extents): {drain_took:.1f} s"
    )
    assert copied >= EXTENT, "at least one whole extent was copied"

    # nothing acknowledged is lost: the writer's blocks, the rest as written by qemu-img
    back = tmp_path / "after.raw"
    reader = survivors[-1]
    read_url = _target_url(c.portal(reader), vol["target_iqn"], vol["lun"])
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

    # the replicas are byte-identical files on the three survivors holding each extent
    for index, rec in _extents(c.state, vol["id"]).items():
        digests = set()
        for member in rec.replicas:
            base = c.dir / "data" / c.name_of(member) / "extents" / vol["id"] / f"{index:016x}"
            dat = hashlib.sha256(base.with_suffix(".dat").read_bytes()).hexdigest()
            sums = hashlib.sha256(base.with_suffix(".sum").read_bytes()).hexdigest()
            digests.add((dat, sums))
        assert len(digests) == 1, f"extent {index}: replica files differ"


def test_a_chunk_server_back_with_a_wiped_disk_is_refilled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same identity, empty disk (a replaced drive): the extent map still names the server, so
    no member is down and nothing waits for `replace_after`. At start it finds the replicas
    it should hold missing, leaves those replica sets, and re-replication copies them back."""
    monkeypatch.setenv("LUNASTOR_REPAIR_INTERVAL", "0.5")
    directory = tmp_path / "dev"
    c = Cluster(directory, dev_up(directory, chunks=3, lease_ttl=2.0))
    try:
        vol = c.create_exported_volume("wiped", f"{VOLUME // MIB}MiB", QEMU_IQN)
        url = _target_url(c.portal(c.chunks[0]), vol["target_iqn"], vol["lun"])
        _wait_lun(url, QEMU_IQN)
        image = tmp_path / "image.raw"
        image.write_bytes(os.urandom(VOLUME))
        conv = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), url)
        assert conv.returncode == 0, conv.stderr
        before = _extents(c.state, vol["id"])
        victim = c.chunks[2]
        victim_id = c.chunk_id(victim)
        assert all(victim_id in e.replicas for e in before.values())

        lunastor("dev", "stop", victim, "--kill", "--dir", str(c.dir))
        shutil.rmtree(c.dir / "data" / victim / "extents")  # the identity file stays
        lunastor("dev", "start", victim, "--dir", str(c.dir))

        def refilled() -> bool:
            now = _extents(c.state, vol["id"])
            return all(
                victim_id in now[i].replicas
                and len(now[i].replicas) == 3
                and now[i].gen >= e.gen + 2  # left (gen + 1), joined again (gen + 1)
                and not now[i].converging
                for i, e in before.items()
            )

        wait_for(refilled, 180, f"{victim} to hold every extent again")
        # read through the refilled server's portal: its local replicas are read first
        back = tmp_path / "back.raw"
        local = _target_url(c.portal(victim), vol["target_iqn"], vol["lun"])
        conv = run("qemu-img", "convert", "-f", "raw", "-O", "raw", local, str(back))
        assert conv.returncode == 0, conv.stderr
        assert back.read_bytes() == image.read_bytes()
        for index, rec in _extents(c.state, vol["id"]).items():
            digests = set()
            for member in rec.replicas:
                name = c.name_of(member)
                base = c.dir / "data" / name / "extents" / vol["id"] / f"{index:016x}"
                digests.add(hashlib.sha256(base.with_suffix(".dat").read_bytes()).hexdigest())
            assert len(digests) == 1, f"extent {index}: replica files differ"
    finally:
        lunastor("dev", "down", "--dir", str(directory), check=False)
