"""The replicated data path in a real dev cluster: a volume created and exported through the
REST API (the CLI), served by every chunk server over iSCSI, with 3 replicas; then a
verified-write workload through one access point while a secondary and then a primary are
killed with SIGKILL (docs/datapath.md)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.extent_pages import extent_records
from lunastor.common.records import ExtentRecord, Keys
from tests.support.devcluster import dev_up, lunastor
from tests.support.procs import wait_for

QEMU_IQN = "iqn.2008-11.org.linux-kvm"  # what qemu-img/qemu-io log in as by default
MIB = 1 << 20
BLOCK = 4096


def _target_url(portal: str, target: str, lun: int) -> str:
    return f"iscsi://{portal}/{target}/{lun}"


def run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    # errors="replace": INQUIRY pages print binary designators (the NAA) as raw bytes
    return subprocess.run(
        argv, capture_output=True, text=True, errors="replace", timeout=timeout, check=False
    )


def _extents(state: dict[str, Any], volume_id: str) -> dict[int, ExtentRecord]:
    async def read() -> dict[int, ExtentRecord]:
        cfg = EtcdConfig(endpoints=state["etcd"]["endpoints"], namespace=state["etcd"]["namespace"])
        async with await Etcd.connect(cfg) as etcd:
            kvs, _ = await etcd.get_prefix(Keys.volume_extents(volume_id))
        return {r.index: r for r in extent_records(kvs)}

    return asyncio.run(read())


class Cluster:
    def __init__(self, directory: Path, state: dict[str, Any]) -> None:
        self.dir = directory
        self.state = state
        self.chunks = sorted(n for n, d in state["daemons"].items() if d["kind"] == "chunk")

    def portal(self, name: str) -> str:
        return str(self.state["daemons"][name]["endpoints"]["portal"])

    def chunk_id(self, name: str) -> str:
        return (self.dir / "data" / name / "chunk-id").read_text().strip()

    def name_of(self, chunk_id: str) -> str:
        return next(n for n in self.chunks if self.chunk_id(n) == chunk_id)

    def cli(self, *args: str) -> Any:
        return json.loads(lunastor(*args, "--dir", str(self.dir), "--json").stdout)

    def create_exported_volume(self, name: str, size: str, *initiators: str) -> dict[str, Any]:
        vol = self.cli("volume", "create", name, "--size", size)
        for iqn in initiators:
            lunastor("export", "add", name, iqn, "--dir", str(self.dir))
        return dict(vol)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    state = dev_up(tmp_path / "dev", chunks=3, lease_ttl=2.0)
    try:
        yield Cluster(tmp_path / "dev", state)
    finally:
        lunastor("dev", "down", "--dir", str(tmp_path / "dev"), check=False)


def _refused(initiator: str, url: str) -> bool:
    return run("iscsi-inq", "-i", initiator, url, timeout=20).returncode != 0


def _wait_lun(url: str, initiator: str) -> None:
    def ready() -> bool:
        return run("iscsi-inq", "-i", initiator, url, timeout=20).returncode == 0

    wait_for(ready, 30, f"{url} to answer INQUIRY")


def test_volume_is_served_by_every_chunk_server_with_three_identical_replicas(
    cluster: Cluster, tmp_path: Path
) -> None:
    other = "iqn.2026-11.test:not-exported"
    libiscsi = "iqn.2026-11.test:libiscsi"
    vol = cluster.create_exported_volume("data1", "192MiB", QEMU_IQN, libiscsi)
    urls = [_target_url(cluster.portal(c), vol["target_iqn"], vol["lun"]) for c in cluster.chunks]
    identities = set()
    for url in urls:
        _wait_lun(url, libiscsi)
        inq = run("iscsi-inq", "-i", libiscsi, "-e", "1", "-c", "131", url)
        serial = run("iscsi-inq", "-i", libiscsi, "-e", "1", "-c", "128", url)
        assert inq.returncode == 0 and serial.returncode == 0, inq.stderr + serial.stderr
        assert f"Unit Serial Number:[{vol['id']}]" in serial.stdout
        identities.add(inq.stdout)  # NAA, T10 vendor id, target name: the same everywhere
        cap = run("iscsi-readcapacity16", "-i", libiscsi, url)
        assert cap.returncode == 0, cap.stderr
        assert f"RETURNED LOGICAL BLOCK ADDRESS:{192 * MIB // 512 - 1}" in cap.stdout
        # LUN masking: an initiator the volume is not exported to cannot log in
        masked = run("iscsi-inq", "-i", other, url)
        assert masked.returncode != 0 and "Authorization failure" in masked.stdout + masked.stderr
    assert len(identities) == 1

    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(64 * MIB))
    start = time.monotonic()
    conv = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), urls[0])
    elapsed = time.monotonic() - start
    assert conv.returncode == 0, conv.stderr
    print(f"qemu-img convert 64 MiB through one chunk server, 3 replicas: {64 / elapsed:.1f} MB/s")
    for url in urls:  # the same data through every access point
        cmp = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), url)
        assert cmp.returncode == 0, f"{url}: {cmp.stdout} {cmp.stderr}"

    # GET LBA STATUS (qemu's block status): the written 64 MiB mapped, the rest deallocated
    mapped = run("qemu-img", "map", "-f", "raw", "--output=json", urls[1])
    assert mapped.returncode == 0 and not mapped.stderr, mapped.stderr
    runs = [(r["start"], r["length"], r["data"]) for r in json.loads(mapped.stdout)]
    assert runs == [(0, 64 * MIB, True), (64 * MIB, 128 * MIB, False)], runs

    extents = _extents(cluster.state, vol["id"])
    assert set(extents) == {0}, "64 MiB written from offset 0 touch extent 0 only (thin)"
    assert sorted(extents[0].replicas) == sorted(cluster.chunk_id(c) for c in cluster.chunks)
    # gen 2 when its primary moved to the access point that wrote it all (locality)
    assert extents[0].gen in (1, 2), extents[0]
    digests = set()
    for c in cluster.chunks:
        base = cluster.dir / "data" / c / "extents" / vol["id"] / f"{0:016x}"
        dat = base.with_suffix(".dat").read_bytes()
        sums = base.with_suffix(".sum").read_bytes()
        digests.add((hashlib.sha256(dat).hexdigest(), hashlib.sha256(sums).hexdigest()))
        assert dat == image.read_bytes()
    assert len(digests) == 1, "replica files differ between chunk servers"


# -- verified writes across failures ------------------------------------------------------------


def pattern(block: int, version: int) -> bytes:
    """A self-checking 4 KiB block: its own number and version, then a digest-derived fill."""
    head = f"lunastor block {block} version {version}\n".encode()
    seed = hashlib.sha256(head).digest()
    return (head + seed * (BLOCK // len(seed) + 1))[:BLOCK]


class QemuIo:
    """One qemu-io process: a command at a time; a write is acknowledged when qemu-io says
    `wrote`."""

    def __init__(self, url: str, workdir: Path) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen(
            ["qemu-io", "-f", "raw", url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def write(self, offset: int, data: bytes, timeout: float = 120) -> bool:
        src = self.workdir / "pattern"
        src.write_bytes(data)
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"write -f -s {src} {offset} {len(data)}\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if f"wrote {len(data)}/{len(data)} bytes at offset {offset}" in line:
                return True
            if "failed" in line or "error" in line.lower():
                return False

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def test_acknowledged_writes_survive_killing_a_secondary_then_a_primary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three chunk servers, two SIGKILLed: the last one must keep acknowledging alone.
    monkeypatch.setenv("LUNASTOR_MIN_REPLICAS", "1")
    directory = tmp_path / "dev"
    c = Cluster(directory, dev_up(directory, chunks=3, lease_ttl=2.0))
    try:
        _verified_writes_across_kills(c, tmp_path)
    finally:
        lunastor("dev", "down", "--dir", str(directory), check=False)


def _verified_writes_across_kills(c: Cluster, tmp_path: Path) -> None:
    size = 512 * MIB  # 8 extents of 64 MiB: their primaries spread over the servers
    vol = c.create_exported_volume("verified", "512MiB", QEMU_IQN)
    ap = c.chunks[0]  # the access point the initiator uses; never killed
    url = _target_url(c.portal(ap), vol["target_iqn"], vol["lun"])
    _wait_lun(url, QEMU_IQN)
    blocks = [e * (64 * MIB // BLOCK) + k * 3001 + 7 for e in range(8) for k in range(6)]
    acked: dict[int, int] = {}  # block -> last acknowledged version
    maybe: dict[int, set[int]] = {b: set() for b in blocks}  # unacknowledged attempts since
    io = QemuIo(url, tmp_path)
    version = 0

    def round_of_writes() -> None:
        nonlocal version
        version += 1
        for b in blocks:
            if io.write(b * BLOCK, pattern(b, version)):
                acked[b] = version
                maybe[b] = set()
            else:
                maybe[b].add(version)

    try:
        round_of_writes()
        extents = _extents(c.state, vol["id"])
        assert len(extents) == 8 and all(len(e.replicas) == 3 for e in extents.values())
        # a chunk server other than the access point that is primary of some extent; the
        # third server, a secondary of that extent, dies first
        primaries = {e.primary for e in extents.values()} - {c.chunk_id(ap)}
        assert primaries, "every extent's primary is the access point: no primary to kill"
        victim_primary = c.name_of(sorted(primaries)[0])
        victim_secondary = next(n for n in c.chunks if n not in (ap, victim_primary))

        lunastor("dev", "stop", victim_secondary, "--kill", "--dir", str(c.dir))
        round_of_writes()
        extents = _extents(c.state, vol["id"])
        gone = c.chunk_id(victim_secondary)
        assert all(gone not in e.replicas for e in extents.values()), extents
        target_extents = [i for i, e in extents.items() if e.primary == c.chunk_id(victim_primary)]
        assert target_extents, "the surviving non-access-point server lost every primary"

        lunastor("dev", "stop", victim_primary, "--kill", "--dir", str(c.dir))
        round_of_writes()
        round_of_writes()
        extents = _extents(c.state, vol["id"])
        assert all(e.replicas == [c.chunk_id(ap)] for e in extents.values()), extents
        assert all(not e.converging for e in extents.values())
    finally:
        io.close()

    assert all(acked.get(b) == version for b in blocks), "writes after the kills were refused"
    image = tmp_path / "after.raw"
    conv = run("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(image))
    assert conv.returncode == 0, conv.stderr
    data = image.read_bytes()
    assert len(data) == size
    lost = []
    for b in blocks:
        got = data[b * BLOCK : (b + 1) * BLOCK]
        allowed = {pattern(b, v) for v in {acked[b]} | maybe[b]}
        if got not in allowed:
            lost.append(b)
    assert not lost, f"acknowledged blocks lost: {lost}"

    # The killed secondary comes back with replicas that missed writes: through its own
    # portal the volume must still read the acknowledged data (never its stale copies).
    lunastor("dev", "start", victim_secondary, "--dir", str(c.dir))
    back = _target_url(c.portal(victim_secondary), vol["target_iqn"], vol["lun"])
    _wait_lun(back, QEMU_IQN)
    again = tmp_path / "again.raw"
    conv = run("qemu-img", "convert", "-f", "raw", "-O", "raw", back, str(again))
    assert conv.returncode == 0, conv.stderr
    assert again.read_bytes() == data


def test_chap_set_through_the_api_is_enforced_by_every_chunk_server(cluster: Cluster) -> None:
    # meta seals the secret with its key; every chunk server opens it with the same key
    ini = "iqn.2026-11.test:chap"
    vol = cluster.create_exported_volume("chap1", "8MiB", ini)
    target = vol["target_iqn"]
    lunastor(
        "target",
        "set-chap",
        target,
        "--user",
        "alice",
        "--secret",
        "correct-horse-battery",
        "--dir",
        str(cluster.dir),
    )
    for c in cluster.chunks:
        plain = _target_url(cluster.portal(c), target, vol["lun"])
        authed = f"iscsi://alice%correct-horse-battery@{cluster.portal(c)}/{target}/{vol['lun']}"
        wrong = f"iscsi://alice%wrong-secret-here@{cluster.portal(c)}/{target}/{vol['lun']}"
        wait_for(partial(_refused, ini, plain), 30, f"{c} to require CHAP")
        assert run("iscsi-inq", "-i", ini, authed).returncode == 0
        assert run("iscsi-inq", "-i", ini, wrong).returncode != 0
