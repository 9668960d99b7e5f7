"""Bad data directories on a live dev cluster, under a verified libiscsi writer (issue 5).

* A data directory that disappears (unmounted) or returns EIO (ext4 on a loop device whose
  backing file is cut to nothing) is taken out of service: the chunk server stops using it,
  reports it (`lunastor_data_dir_failed`, its live status record) and leaves the replica sets
  of the extents whose replicas were there; nothing acknowledged is lost.
* A full data directory: a write that needs space gets DATA PROTECT / SPACE ALLOCATION FAILED
  (qemu reports ENOSPC), nothing is torn, overwrites and reads go on, and the same write works
  once space is freed.

The data directories are small tmpfs and loop mounts (root needed, as in
test_data_dir_failures.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.records import ChunkServerStatus, Keys
from tests.integration.chunk.test_fault_rounds import TOOL
from tests.integration.chunk.test_replicated_cluster import Cluster, QemuIo, _extents, run
from tests.integration.test_redirector_failover import Journal, stop_writer
from tests.support.devcluster import dev_up, lunastor
from tests.support.procs import wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("iscsi-ls") is None,
    reason="gcc and libiscsi-bin are needed",
)

INITIATOR = "iqn.2008-11.org.linux-kvm"  # qemu-io's default name: one ACL entry for both
MIB = 1 << 20
EXTENT = 4 * MIB


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if got.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root/CAP_SYS_ADMIN): {got.stderr.strip()}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _mount_ext4_loop(path: Path, image: Path, size: int) -> str:
    """An ext4 file system on a loop device over a sparse file; returns the loop device."""
    path.mkdir(parents=True, exist_ok=True)
    with image.open("wb") as f:
        f.truncate(size)
    steps = [["mkfs.ext4", "-q", str(image)], ["mount", "-o", "loop", str(image), str(path)]]
    for step in steps:
        got = subprocess.run(step, capture_output=True, text=True)
        if got.returncode != 0:
            pytest.skip(f"cannot {' '.join(step)} (needs root and loop devices): {got.stderr}")
    found = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
    return found.stdout.split(":")[0]


def _fail_with_eio(image: Path, loop: str) -> None:
    """Every later read or write of the loop device fails with EIO: its backing file shrinks
    to nothing (like a disk that died)."""
    with image.open("r+b") as f:
        f.truncate(0)
    got = subprocess.run(["losetup", "-c", loop], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr


def _metric(admin: str, pattern: str) -> float:
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


def _live_status(state: dict[str, object], chunk_id: str) -> ChunkServerStatus | None:
    async def read() -> ChunkServerStatus | None:
        etcd_state = state["etcd"]
        assert isinstance(etcd_state, dict)
        cfg = EtcdConfig(endpoints=etcd_state["endpoints"], namespace=etcd_state["namespace"])
        async with await Etcd.connect(cfg) as etcd:
            kv = await etcd.get(Keys.live_chunk(chunk_id))
        return ChunkServerStatus.from_json(kv.value) if kv is not None else None

    return asyncio.run(read())


class Writer:
    """tests/tools/verified_writer.c against one portal."""

    def __init__(self, binary: Path, url: str, blocks: int, stride: int, tmp: Path) -> None:
        self.binary, self.url, self.blocks, self.stride = binary, url, blocks, stride
        self.out, self.err, self.stop = tmp / "w.out", tmp / "w.err", tmp / "w.stop"
        with self.out.open("w") as stdout, self.err.open("w") as stderr:
            self.proc = subprocess.Popen(
                [str(binary), url, INITIATOR, str(blocks), str(stride), str(self.stop)],
                stdout=stdout,
                stderr=stderr,
            )

    def acks(self) -> int:
        return sum(line.startswith("A ") for line in self.out.read_text().splitlines())

    def rounds(self, n: int, what: str) -> None:
        want = self.acks() + n * self.blocks
        wait_for(
            lambda: self.acks() >= want or self.proc.poll() is not None, 90, what, interval=0.1
        )
        assert self.proc.poll() is None, self.err.read_text()

    def finish(self) -> Journal:
        stop_writer(self.proc, self.stop)
        assert self.proc.returncode == 0, self.err.read_text()
        journal = Journal.parse(self.out.read_text())
        assert journal.failed == 0, f"writes failed: {self.err.read_text()}"
        return journal

    def verify(self, journal: Journal, portal_url: str) -> None:
        got = run(
            str(self.binary), "--read", portal_url, INITIATOR, str(self.blocks), str(self.stride)
        )
        assert got.returncode == 0, got.stderr
        acked = journal.acked()
        bad = []
        for line in got.stdout.splitlines():
            _, block, version, *_ = line.split()
            b = int(block)
            allowed = {acked[b]} | {w for w in journal.issued[b] if w > acked[b]}
            if version == "bad" or int(version) not in allowed:
                bad.append((b, acked[b], version))
        assert len(got.stdout.splitlines()) == self.blocks
        assert not bad, f"acknowledged blocks lost, stale or corrupt: {bad}"


def _replica_dirs(c: Cluster, name: str) -> list[Path]:
    config = (c.dir / "config" / f"{name}.toml").read_text()
    match = re.search(r"^data_dirs = \[(.*)\]$", config, re.M)
    assert match is not None
    return [Path(p.strip().strip('"')) for p in match.group(1).split(",")]


def _identical_members(c: Cluster, volume: str, failed: Path | None = None) -> None:
    """Every member holds one replica of each extent (outside the `failed` data directory,
    whose files no server uses any more) and the members' files are identical."""
    for index, rec in sorted(_extents(c.state, volume).items()):
        assert not rec.converging, rec
        digests = set()
        for member in rec.replicas:
            name = c.name_of(member)
            found = [
                d / "extents" / volume / f"{index:016x}.dat"
                for d in _replica_dirs(c, name)
                if d != failed and (d / "extents" / volume / f"{index:016x}.hdr").exists()
            ]
            assert len(found) == 1, f"{name} has {found} for extent {index}"
            digests.add(
                tuple(
                    hashlib.sha256(found[0].with_suffix(x).read_bytes()).digest()
                    for x in (".dat", ".sum")
                )
            )
        assert len(digests) == 1, f"extent {index}: the members' replica files differ"


def _command(io: QemuIo, command: str) -> str:
    """One qemu-io write command; its output up to the line that says how it ended."""
    assert io.proc.stdin is not None
    io.proc.stdin.write(command + "\n")
    io.proc.stdin.flush()
    out = ""
    while "wrote " not in out and "write failed" not in out:
        out += io.lines.get(timeout=120)
    return out


@pytest.fixture
def writer_binary(tmp_path: Path) -> Path:
    binary = tmp_path / "verified-writer"
    build = run("gcc", "-O2", "-Wall", "-o", str(binary), str(TOOL), "-liscsi")
    assert build.returncode == 0, build.stderr
    return binary


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    monkeypatch.setenv("LUNASTOR_EXTENT_SIZE", str(EXTENT))
    monkeypatch.setenv("LUNASTOR_DATA_DIR_CHECK_INTERVAL", "0.5")
    directory = tmp_path / "dev"
    mounts: list[Path] = []
    # every chunk server's data directory is its own small file system
    for i in (1, 2, 3):
        mounts.append(directory / "data" / f"chunk{i}")
        _mount_tmpfs(mounts[-1], "96m")
    try:
        state = dev_up(directory, chunks=3, lease_ttl=2.0)
        try:
            yield Cluster(directory, state)
        finally:
            lunastor("dev", "down", "--dir", str(directory), check=False)
    finally:
        for m in mounts:
            _umount(m)


@pytest.mark.parametrize("how", ["unmounted", "eio"])
def test_a_failed_data_dir_is_taken_out_of_service_and_nothing_acknowledged_is_lost(
    cluster: Cluster, tmp_path: Path, writer_binary: Path, how: str
) -> None:
    c = cluster
    victim = "chunk1"
    victim_id = c.chunk_id(victim)
    # chunk1 gets a second data directory, a bigger file system, so new replicas land there
    extra = tmp_path / "extra"
    image = tmp_path / "extra.img"
    loop = _mount_ext4_loop(extra, image, 512 * MIB)
    try:
        config = c.dir / "config" / f"{victim}.toml"
        original = _replica_dirs(c, victim)
        text = config.read_text()
        dirs = ", ".join(f'"{d}"' for d in [extra, *original])
        config.write_text(re.sub(r"^data_dirs = .*$", f"data_dirs = [{dirs}]", text, flags=re.M))
        lunastor("dev", "stop", victim, "--dir", str(c.dir))
        lunastor("dev", "start", victim, "--dir", str(c.dir))

        vol = c.create_exported_volume("dirfail", "32MiB", INITIATOR)
        target, lun = vol["target_iqn"], vol["lun"]
        ap = f"iscsi://{c.portal('chunk2')}/{target}/{lun}"
        wait_for(lambda: run("iscsi-inq", "-i", INITIATOR, ap).returncode == 0, 30, "the LUN")
        w = Writer(writer_binary, ap, 32, MIB, tmp_path)
        try:
            w.rounds(2, "two rounds of writes")
            extents = _extents(c.state, vol["id"])
            held = [i for i, e in extents.items() if victim_id in e.replicas]
            assert held and all(len(e.replicas) == 3 for e in extents.values())
            assert (extra / "extents" / vol["id"]).is_dir(), "no replica on the extra directory"

            if how == "unmounted":
                _umount(extra)
            else:
                _fail_with_eio(image, loop)

            admin = c.state["daemons"][victim]["endpoints"]["admin"]
            failed = rf'^lunastor_data_dir_failed\{{path="{re.escape(str(extra))}"\}} ([0-9.e+]+)$'
            wait_for(lambda: _metric(admin, failed) == 1.0, 30, "the metric to report the dir")

            gens = {i: e.gen for i, e in extents.items()}

            def restored() -> bool:
                # the victim left each replica set (gen + 1), then re-replication brought the
                # extent back to 3 members (gen + 1), wherever the repair planner placed it
                now = _extents(c.state, vol["id"])
                return all(now[i].gen >= gens[i] + 2 and len(now[i].replicas) == 3 for i in held)

            wait_for(restored, 120, "every extent it held a replica of to be re-replicated")
            status = _live_status(c.state, victim_id)
            assert status is not None
            states = {d["path"]: d.get("state") for d in status.data_dirs}
            assert states == {str(extra): "failed", **{str(d): "ok" for d in original}}, states
            w.rounds(2, "two more rounds after the data directory failed")
        finally:
            journal = w.finish()
        w.verify(journal, f"iscsi://{c.portal('chunk3')}/{target}/{lun}")
        _identical_members(c, vol["id"], failed=extra)
        after = _extents(c.state, vol["id"])
        assert all(len(e.replicas) == 3 for e in after.values()), after
    finally:
        _umount(extra)
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def test_a_full_data_dir_refuses_writes_that_need_space_cleanly_and_recovers(
    cluster: Cluster, tmp_path: Path, writer_binary: Path
) -> None:
    c = cluster
    vol = c.create_exported_volume("full", "16MiB", INITIATOR)
    target, lun = vol["target_iqn"], vol["lun"]
    ap = f"iscsi://{c.portal('chunk2')}/{target}/{lun}"
    wait_for(lambda: run("iscsi-inq", "-i", INITIATOR, ap).returncode == 0, 30, "the LUN")
    # one verified block at the start of each extent
    w = Writer(writer_binary, ap, 4, EXTENT, tmp_path)
    ballast = None
    try:
        w.rounds(2, "two rounds of writes")
        before = _extents(c.state, vol["id"])
        primary = c.name_of(before[0].primary)
        ballast = c.dir / "data" / primary / "ballast"
        with ballast.open("wb") as f, contextlib.suppress(OSError):
            while True:  # until ENOSPC
                f.write(bytes(MIB))
                f.flush()
        free = os.statvfs(ballast.parent).f_bavail
        assert free == 0, f"{free} blocks still free"
        w.rounds(2, "overwrites of allocated blocks while the data directory is full")

        io = QemuIo(ap, tmp_path)
        reader = f"iscsi://{c.portal('chunk3')}/{target}/{lun}"
        try:
            # 64 KiB in blocks nothing has allocated yet
            line = _command(io, f"write -P 0x5a {2 * MIB} 65536")
            # DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT, which qemu turns into ENOSPC
            assert "DATA PROTECTION(7)" in line and "(0x2707)" in line, line
            assert "write failed: No space left on device" in line, line
            # nothing torn: the range still reads as never written, through another server
            got = run("qemu-io", "-f", "raw", "-c", f"read -P 0 {2 * MIB} 65536", reader)
            assert got.returncode == 0 and "read 65536/65536" in got.stdout, got.stdout
            assert _extents(c.state, vol["id"]) == before, "the refusal changed the extent map"
            ballast.unlink()
            ballast = None
            line = _command(io, f"write -P 0x5a {2 * MIB} 65536")
            assert "wrote 65536/65536" in line, f"still refused after space was freed: {line}"
        finally:
            io.close()
        got = run("qemu-io", "-f", "raw", "-c", f"read -P 0x5a {2 * MIB} 65536", reader)
        assert got.returncode == 0 and "read 65536/65536" in got.stdout, got.stdout
        w.rounds(1, "a round of writes after space was freed")
    finally:
        if ballast is not None:
            ballast.unlink(missing_ok=True)
        journal = w.finish()
    w.verify(journal, f"iscsi://{c.portal('chunk3')}/{target}/{lun}")
    _identical_members(c, vol["id"])
