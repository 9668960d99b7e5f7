"""Network partitions with real processes in network namespaces (issue 14, docs/faults.md,
"Partitions").

The lab of tests/integration/test_redirector_netns.py (`start_lab`): etcd and meta on one host,
two redirectors (the leader holds the VIP), three chunk hosts each running `lunastor-chunk`, a
client. Each case makes a fresh volume, runs the verified writer (tests/tools/verified_writer.c)
through the VIP and a reader that reads every block again and again through one chunk server's
own portal (`verified-writer --read`, as a second multipath path would), then cuts links with
nftables rules inside a host's namespace (tests/support/netcut.py: links stay up, packets are
dropped, one way or both) and heals them:

1. the writer's chunk server cut off from etcd only: it stops acknowledging once it can no
   longer prove its lease (its own write counter stops), the others take its extents over;
2. a secondary of every extent cut off from etcd only, read through while the writer goes on
   elsewhere: the primary removes it, and it serves no read of what it missed (its read
   lease counts only once its map has caught up with the primary's);
3. a secondary of every extent cut off from its peers only: writes go on without it (its
   silence for a lease makes the primary remove it), reads through it never return what it
   missed;
4. the writer's chunk server, primary of every extent, cut off from its peers only: writes
   stall until the cut heals (it cannot reach `min_replicas` members; nobody may take over
   from a primary whose lease is alive);
5. an asymmetric cut: a secondary's packets to the primary dropped, the other way delivered;
6. the redirector leader cut off from etcd: never two VIP holders (addresses sampled every
   50 ms on both hosts, the client's ARP entry for the VIP never flips back).

The stale read case 2 found (rarely: it needs the heal to beat the cut-off server's watch) is
also reproduced deterministically with the in-process cluster of test_replication.py.

Each case ends with the cut healed and no operator: the writer completes rounds again, every
chunk server's portal reads the whole volume, and every operation (writes with their issue and
acknowledgement times, each read with its process's start and end) goes through the register
model of tests/fault/test_history.py: 0 anomalies, which includes 0 acknowledged writes lost
(the final read-backs start after the last acknowledgement).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lunastor.chunk.config import ChunkConfig
from lunastor.iscsi.blockdev import NotReady
from tests.fault.test_history import Op, anomalies
from tests.integration.chunk.test_replication import Cluster as Members
from tests.integration.chunk.test_replication import blocks
from tests.integration.chunk.test_replication import cluster as cluster
from tests.integration.test_redirector_failover import (
    BLOCKS,
    STRIDE,
    TOOL,
    VOLUME,
    Journal,
    stop_writer,
)
from tests.integration.test_redirector_netns import (
    CLIENT_IQN,
    ENV,
    ROOT,
    VIP,
    Cluster,
    VipMonitor,
    inquiry_through_vip,
    normal_sessions,
    start_lab,
)
from tests.support.netcut import heal, mac, metric, neighbour, partition
from tests.support.netns import Host, Lab, netns_available
from tests.support.procs import wait_for

reason = netns_available() or (
    None
    if shutil.which("gcc") and shutil.which("iscsi-ls") and shutil.which("nft")
    else "gcc, libiscsi-bin and nftables needed"
)
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")

LEASE_TTL = 2.0  # chunk servers (redirectors: test_redirector_netns.LEASE_TTL, 3 s)
HOLD = 10.0  # seconds a cut lasts: five chunk leases
REPAIR_INTERVAL = ChunkConfig.repair_interval  # the lab's: a repair (and locality claim) pass
MARGIN = 2.0  # a write in flight when the lease lapses may still complete (loaded machine)
READER_IQN = "iqn.2026-11.org.example:partition-reader"
ADMIN_PORT = 9100  # every chunk server's /metrics (start_lab)
WRITES = "lunastor_volume_io_bytes_total"  # bytes of writes an access point acknowledged


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("partitions")
    with Lab() as net:
        etcd = net.add_host("etcd")
        reds = [net.add_host("red1"), net.add_host("red2")]
        chunks = [net.add_host(f"chunk{i}") for i in (1, 2, 3)]
        c = Cluster(net, directory, etcd, reds, chunks, net.add_host("client"))
        try:
            start_lab(c, lease_ttl=LEASE_TTL, volume="partitions", size=16 << 20)
            yield c
        finally:
            for host in net.hosts.values():
                heal(host)
            for proc in c.procs.values():
                proc.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("tool") / "verified-writer"
    build = subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(binary), str(TOOL), "-liscsi"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    return binary


class Workload:
    """A fresh volume exported to the writer and the reader; the verified writer through the
    VIP; `start_reader` adds the reader on one chunk server's portal. Every operation is kept
    for the register model."""

    def __init__(self, lab: Cluster, tool: Path, tmp_path: Path, name: str) -> None:
        self.lab, self.tool = lab, tool
        vol = lab.call("POST", "/v1/volumes", {"name": name, "size_bytes": VOLUME}, ok=(201,))
        for iqn in (CLIENT_IQN, READER_IQN):
            lab.call("POST", f"/v1/volumes/{vol['id']}/exports", {"initiator": iqn}, ok=(201,))
        self.id, self.target, self.lun = vol["id"], vol["target_iqn"], vol["lun"]
        self.reads: list[Op] = []
        self.bad: list[str] = []  # torn or foreign blocks read
        self._stop_reader = threading.Event()
        self._reader: threading.Thread | None = None
        self.out, self.err = tmp_path / "writer.out", tmp_path / "writer.err"
        self.stop_file = tmp_path / "stop"
        inquiry = ("iscsi-inq", "-i", CLIENT_IQN, self.url(VIP))
        wait_for(
            lambda: lab.client_run(*inquiry).returncode == 0, 30, "the new LUN through the VIP"
        )
        argv = [str(tool), self.url(VIP), CLIENT_IQN, str(BLOCKS), str(STRIDE)]
        with self.out.open("w") as stdout, self.err.open("w") as stderr:
            self.proc = subprocess.Popen(
                lab.client.cmd(*argv, str(self.stop_file)),
                stdout=stdout,
                stderr=stderr,
                env=ENV,
                cwd=ROOT,
            )

    def url(self, address: str) -> str:
        return f"iscsi://{address}:3260/{self.target}/{self.lun}"

    def ack_times(self) -> list[float]:
        lines = self.out.read_text().splitlines()
        return [float(line.split()[3]) for line in lines if line.startswith("A ")]

    def acks(self) -> int:
        return len(self.ack_times())

    def longest_gap(self) -> float:
        """The longest time between two acknowledgements (after `halt`)."""
        return Journal.parse(self.out.read_text()).longest_gap()[0]

    def rounds(self, n: int, timeout: float, what: str) -> float:
        """Wait for `n` more rounds (each block written once) to be acknowledged; the time
        it took."""
        start, began = self.acks(), time.monotonic()
        wait_for(lambda: self.acks() >= start + n * BLOCKS, timeout, what, interval=0.2)
        return time.monotonic() - began

    def access_point(self) -> Host:
        """The chunk server holding the writer's session (before the reader logs in)."""
        on = [h for h in self.lab.chunks if normal_sessions(h) >= 1]
        assert len(on) == 1, f"the writer's session is on {[h.address for h in on]}"
        return on[0]

    def primaries(self) -> set[str]:
        """The chunk ids that are the primary of one of the volume's extents now (read in
        etcd's host: the test process cannot reach the lab)."""
        code = (
            "import json, sys\n"
            "from tests.integration.chunk.test_replicated_cluster import _extents\n"
            "got = _extents(json.loads(sys.argv[1]), sys.argv[2])\n"
            "print(json.dumps([r.primary for r in got.values()]))"
        )
        state = json.dumps({"etcd": self.lab.etcd_settings()})
        argv = ["env", f"PYTHONPATH={ROOT}", sys.executable, "-c", code, state, self.id]
        return set(json.loads(self.lab.etcd.run(*argv).stdout))

    def settled(self, ap: Host) -> None:
        """Wait until `ap`, the writer's access point, is the primary of every extent (the
        primary follows the access point: docs/datapath.md, "Locality")."""
        me = self.lab.chunk_ids[ap.address]
        wait_for(lambda: self.primaries() == {me}, 90, "the primaries to follow the writer")

    def read(self, host: Host) -> bool:
        """Read every block once through `host`'s portal; whether every block was read."""
        argv = [str(self.tool), "--read", self.url(host.address), READER_IQN]
        start = time.monotonic()
        try:
            proc = subprocess.run(
                self.lab.client.cmd(*argv, str(BLOCKS), str(STRIDE)),
                capture_output=True,
                text=True,
                timeout=20,
                env=ENV,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False  # what it read is not known: nothing to check
        end = time.monotonic()
        got = 0
        for line in proc.stdout.splitlines():
            _, block, version = line.split()[:3]
            if version == "bad":
                self.bad.append(f"{host.address}: {line}")
            else:
                self.reads.append(Op("read", int(block), int(version), start, end))
                got += 1
        return proc.returncode == 0 and got == BLOCKS

    def start_reader(self, host: Host) -> None:
        def loop() -> None:
            while not self._stop_reader.is_set():
                if not self.read(host):
                    self._stop_reader.wait(0.2)

        self._reader = threading.Thread(target=loop, daemon=True)
        self._reader.start()
        before = len(self.reads)
        wait_for(lambda: len(self.reads) >= before + BLOCKS, 30, "the reader's first pass")

    def halt(self) -> None:
        """Stop the reader and the writer (for a `finally`: it never raises)."""
        self._stop_reader.set()
        if self._reader is not None:
            self._reader.join(30)
        stop_writer(self.proc, self.stop_file)

    def writes(self) -> list[Op]:
        """The writer's operations: issued at I, acknowledged at A (F or none: never)."""
        assert self.proc.returncode == 0, self.err.read_text()[-2000:]
        ops: dict[tuple[int, int], Op] = {}
        for line in self.out.read_text().splitlines():
            kind, block, version, at = line.split()
            key = (int(block), int(version))
            if kind == "I":
                ops.setdefault(key, Op("write", key[0], key[1], float(at)))
            elif kind == "A":
                ops[key].end = float(at)
        return list(ops.values())

    def check(self) -> tuple[int, int]:
        """After `halt`: every chunk server reads the whole volume, and the history has no
        anomaly (the last reads began after the last acknowledgement: an acknowledged write
        they miss is a stale read). Returns (acknowledged writes, reads checked)."""
        writes, lost = self.writes(), []
        for host in self.lab.chunks:
            before = len(self.reads)
            wait_for(lambda h=host: self.read(h), 60, f"{host.address} to read the volume")
            lost += [f"{host.address}: {a}" for a in anomalies(writes + self.reads[before:])]
        assert lost == [], f"acknowledged writes not read back: {lost[:5]}"
        assert self.bad == [], f"torn or foreign blocks read: {self.bad[:5]}"
        found = anomalies(writes + self.reads)
        assert found == [], f"{len(found)} anomalies: {found[:5]}"
        return sum(w.end < float("inf") for w in writes), len(self.reads)


def written(host: Host) -> float:
    """Bytes of writes `host` has acknowledged as an access point since it started."""
    return metric(host, ADMIN_PORT, WRITES, op="write")


def removed(hosts: list[Host]) -> float:
    """Secondaries these chunk servers removed from extents as primaries."""
    return sum(metric(h, ADMIN_PORT, "lunastor_replicas_removed_total") for h in hosts)


def test_chunk_server_cut_off_from_etcd_stops_acknowledging(
    lab: Cluster, tool: Path, tmp_path: Path
) -> None:
    work = Workload(lab, tool, tmp_path, "cut-from-etcd")
    try:
        work.rounds(2, 60, "the writer to complete two rounds")
        victim = work.access_point()
        work.start_reader(next(h for h in lab.chunks if h is not victim))
        with partition(victim, [lab.etcd.address]):
            cut_at = time.monotonic()
            time.sleep(LEASE_TTL + MARGIN)
            lease_over = written(victim)
            time.sleep(HOLD - LEASE_TTL - MARGIN)
            at_heal = written(victim)
            stayed = normal_sessions(victim) >= 1
        healed_at = time.monotonic()
        back = work.rounds(2, 90, "two rounds after the cut healed")
    finally:
        work.halt()
    acked, reads = work.check()
    late = [t for t in work.ack_times() if cut_at + LEASE_TTL + MARGIN < t < healed_at]
    where = "still" if stayed else "no longer"
    print(
        f"\n{victim.address} cut off from etcd for {HOLD:g} s: {at_heal - lease_over:g} bytes "
        f"acknowledged by it from lease TTL + {MARGIN:g} s to the heal; writer {where} on it "
        f"at the heal, {len(late)} acknowledgements in that window; two rounds {back:.1f} s "
        f"after the heal; {acked} writes acknowledged, {reads} reads checked"
    )
    assert at_heal == lease_over, "the cut-off chunk server acknowledged writes past its lease"
    if stayed:
        assert late == [], "writes acknowledged through the cut-off server past its lease"


@dataclass
class SecondaryCut:
    """What `cut_a_secondary` saw."""

    victim: Host
    ap: Host  # the writer's access point, primary of every extent
    second_half: int  # writes acknowledged in the cut's second half
    removed: float  # secondaries the other chunk servers removed meanwhile
    back: float  # seconds from the heal to two more rounds
    acked: int
    reads: int
    gap: float  # the longest time between two acknowledgements


def cut_a_secondary(
    lab: Cluster,
    tool: Path,
    tmp_path: Path,
    name: str,
    peers: Callable[[Host, Host], list[str]],
    *,
    incoming: bool = True,
) -> SecondaryCut:
    """The writer through the VIP until its access point is the primary of every extent, then
    a secondary (read through meanwhile) cut off from `peers(victim, ap)` for HOLD seconds."""
    work = Workload(lab, tool, tmp_path, name)
    try:
        work.rounds(2, 60, "the writer to complete two rounds")
        ap = work.access_point()
        work.settled(ap)
        victim = next(h for h in lab.chunks if h is not ap)  # a secondary of every extent
        others = [h for h in lab.chunks if h is not victim]
        removed_before = removed(others)
        work.start_reader(victim)  # reads through the cut-off server, the writer elsewhere
        # two repair passes of reading: its server would claim what it reads if a member's
        # local reads counted for locality (they do not: docs/datapath.md, "Locality"), and a
        # hand-over to it would put the writer's primary behind the cut
        time.sleep(2 * REPAIR_INTERVAL)
        assert work.primaries() == {lab.chunk_ids[ap.address]}, "the reader took a primary"
        with partition(victim, peers(victim, ap), incoming=incoming):
            time.sleep(HOLD / 2)
            mid = work.acks()
            time.sleep(HOLD / 2)
            end = work.acks()
        back = work.rounds(2, 90, "two rounds after the cut healed")
    finally:
        work.halt()
    acked, reads = work.check()
    dropped = removed(others) - removed_before
    return SecondaryCut(victim, ap, end - mid, dropped, back, acked, reads, work.longest_gap())


def report(cut: SecondaryCut, what: str) -> None:
    print(
        f"\n{cut.victim.address} {what} for {HOLD:g} s: {cut.second_half} writes acknowledged "
        f"in the cut's second half, {cut.removed:g} replicas removed, longest gap "
        f"{cut.gap:.2f} s; two rounds {cut.back:.1f} s after the heal; {cut.acked} writes "
        f"acknowledged, {cut.reads} reads checked"
    )


def test_secondary_cut_off_from_etcd_serves_no_stale_read(
    lab: Cluster, tool: Path, tmp_path: Path
) -> None:
    cut = cut_a_secondary(
        lab, tool, tmp_path, "secondary-cut-from-etcd", lambda victim, ap: [lab.etcd.address]
    )
    report(cut, "(a secondary) cut off from etcd")
    assert cut.second_half > 0, "writes stopped while a secondary was cut off from etcd"


def test_chunk_server_cut_off_from_its_peers(lab: Cluster, tool: Path, tmp_path: Path) -> None:
    def peers(victim: Host, ap: Host) -> list[str]:
        return [h.address for h in lab.chunks if h is not victim]

    cut = cut_a_secondary(lab, tool, tmp_path, "cut-from-peers", peers)
    report(cut, "cut off from its peers")
    assert cut.second_half > 0, "writes stopped while a secondary was cut off from its peers"
    assert cut.removed >= 1, "the cut-off member was never removed"


def test_asymmetric_cut_between_two_chunk_servers(lab: Cluster, tool: Path, tmp_path: Path) -> None:
    # the victim's packets to the primary vanish; the primary's reach it
    cut = cut_a_secondary(
        lab, tool, tmp_path, "asymmetric-cut", lambda victim, ap: [ap.address], incoming=False
    )
    report(cut, "-> its primary dropped")
    assert cut.second_half > 0, "writes stopped while one member could not answer the primary"


def test_primary_cut_off_from_its_peers(lab: Cluster, tool: Path, tmp_path: Path) -> None:
    work = Workload(lab, tool, tmp_path, "primary-cut-from-peers")
    try:
        work.rounds(2, 60, "the writer to complete two rounds")
        victim = work.access_point()
        work.settled(victim)  # the primary of every extent, and the writer's access point
        others = [h for h in lab.chunks if h is not victim]
        work.start_reader(others[0])
        with partition(victim, [h.address for h in others]):
            cut_at = time.monotonic()
            time.sleep(HOLD)
        healed_at = time.monotonic()
        back = work.rounds(2, 90, "two rounds after the cut healed")
    finally:
        work.halt()
    acked, reads = work.check()
    during = [t for t in work.ack_times() if cut_at < t < healed_at]
    print(
        f"\n{victim.address} (primary, access point) cut off from its peers for {HOLD:g} s: "
        f"{len(during)} writes acknowledged during the cut, the last "
        f"{(max(during) - cut_at) if during else 0:.2f} s into it; two rounds {back:.1f} s "
        f"after the heal; {acked} writes acknowledged, {reads} reads checked"
    )


def test_redirector_leader_cut_off_from_etcd(lab: Cluster, tool: Path, tmp_path: Path) -> None:
    work = Workload(lab, tool, tmp_path, "redirector-cut")
    macs = [mac(h) for h in lab.reds]
    arp: list[str | None] = []
    try:
        work.rounds(2, 60, "the writer to complete two rounds")
        work.start_reader(work.access_point())
        old = wait_for(lambda: lab.holders(), 20, "a VIP holder")
        assert len(old) == 1, old
        new = 1 - old[0]
        inquiry_through_vip(lab)  # the client's ARP entry for the VIP names the leader
        arp.append(neighbour(lab.client, VIP))
        with VipMonitor(lab) as monitor, partition(lab.reds[old[0]], [lab.etcd.address]):
            cut_at = time.monotonic()
            while monitor.first_held_by(new, cut_at) is None and time.monotonic() < cut_at + 20:
                arp.append(neighbour(lab.client, VIP))
                time.sleep(0.1)
            taken = monitor.first_held_by(new, cut_at)
            assert taken is not None, "the VIP never moved to the other redirector"
            inquiry_through_vip(lab)
            arp.append(neighbour(lab.client, VIP))
            time.sleep(HOLD - (time.monotonic() - cut_at))
        healed_at = time.monotonic()

        def rejoined() -> bool:
            h = lab.redirector_health(old[0])
            return bool(h and h["lease"] and not h["leader"] and not h["serving"])

        wait_for(rejoined, 30, "the cut-off leader back as a follower")
        assert lab.holders() == [new]
        inquiry_through_vip(lab)
        arp.append(neighbour(lab.client, VIP))
        work.rounds(1, 60, "a round after the heal")
    finally:
        work.halt()
    acked, reads = work.check()
    seen = [m for m in arp if m is not None]
    flips = [m for i, m in enumerate(seen) if i == 0 or m != seen[i - 1]]
    print(
        f"\nredirector red{old[0] + 1} cut off from etcd: red{new + 1} held the VIP "
        f"{taken - cut_at:.2f} s after; ARP entries for the VIP seen: {flips}; rejoined as a "
        f"follower {time.monotonic() - healed_at:.1f} s after the heal; {acked} writes "
        f"acknowledged, {reads} reads checked"
    )
    assert not monitor.doubles(), f"VIP on both hosts: {monitor.doubles()[:3]}"
    # the leader's MAC, then the new holder's, never back: no two hosts answered for the VIP
    assert flips == [macs[old[0]], macs[new]], (flips, macs)
    journal = work.writes()
    assert all(w.end < float("inf") for w in journal), "a write failed: the data path noticed"


@pytest.mark.parametrize("frozen", ["map", "family"])
async def test_a_member_removed_behind_a_frozen_map_gets_no_usable_read_lease(
    cluster: Members, frozen: str
) -> None:
    """Case 2's stale read, made certain: a secondary's map stops following etcd (cut off
    from it), the primary removes it while its link is cut, then the link comes back but the
    map stays frozen. It pings the primary again and is answered; the lease must not count
    until its map has caught up with the primary's (`rev`, docs/datapath.md, "Read leases"),
    so a read through it never returns the data it holds from before the removal.

    `family`: only the volume's own watch stream lags, while another volume's stream has
    gone past the primary's revision (etcd orders no two streams): the lease is judged by the
    volume's own stream, not by the furthest one."""
    v = cluster.volume("chunk-0")
    await v.write(0, blocks(1, 8), fua=False)
    rec = cluster.nodes["chunk-0"].emap.get("vol-t", 0)
    assert rec is not None
    cut = rec.replicas[1]
    member = cluster.nodes[cut]
    stale = cluster.volume(cut)
    assert await stale.read(0, 8) == blocks(1, 8)  # its replica open, read under its lease
    if frozen == "map":
        await member.emap.extents.stop()  # its map stops here
    else:
        await member.emap.extents._families["vol-t"].stop()  # this volume's stream stops here
    dead = cluster.cut(rec.primary, cut)
    via = cluster.volume(next(c for c in cluster.nodes if c != cut))
    await via.write(0, blocks(2, 8), fua=False)  # acknowledged once the member is removed
    after = cluster.nodes[rec.primary].emap.get("vol-t", 0)
    assert after is not None and cut not in after.replicas
    lagging = member.emap.get("vol-t", 0)
    assert lagging is not None and cut in lagging.replicas
    for a, b in ((rec.primary, cut), (cut, rec.primary)):  # the link is back
        del cluster.nodes[a].replicas._clients[(b, 0)]
    await dead.close()
    if frozen == "family":
        # another volume's extent allocated: on every member, the primary's map and the
        # member's stream of that volume now stand past the removal
        await cluster.volume(rec.primary, vid="vol-u").write(0, blocks(3, 8), fua=False)
        newest = cluster.nodes[rec.primary].emap.newest_change()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while member.emap.extents.revision < newest:
            assert loop.time() < deadline, "the member never saw the other volume's extent"
            await asyncio.sleep(0.05)
    pinged = cluster.nodes[rec.primary].node._granted.get(cut, 0.0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while cluster.nodes[rec.primary].node._granted.get(cut, 0.0) == pinged:
        assert loop.time() < deadline, "the member never pinged the primary again"
        await asyncio.sleep(0.05)
    member.path.io_timeout = 2.0
    for _ in range(5):  # each within a lease the primary granted after the removal
        try:
            got = bytes(await stale.read(0, 8))
        except NotReady:
            continue
        assert got == blocks(2, 8), "a removed member served what it held before"
        await asyncio.sleep(0.1)
