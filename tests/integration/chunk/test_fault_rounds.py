"""Seeded kill rounds (issue 5): a verified libiscsi write workload through the redirector's VIP
while, round after round, one process is SIGKILLed at a random moment and restarted.

Each round kills one of:
  * `access_point` - the chunk server the writer is logged in to (found from the chunk
    servers' session metrics): libiscsi logs in again through the VIP and is redirected to
    another chunk server;
  * `primary` - the primary of the extent the writer is writing right now (another server than
    the access point when the extent map allows it);
  * `secondary` - a secondary of that extent (not the access point);
  * `meta` - the meta service (the data path must not need it).
The writer (tests/tools/verified_writer.c) writes versioned self-checking 4 KiB blocks, one
command in flight, and journals every acknowledgement. The victim stays down until the writer
made progress without it, then it is restarted.

Until re-replication exists an extent loses a member per chunk-server kill, so rounds run in
*phases*: a fresh volume (fully replicated again, its extents placed over the live servers) per
at most two chunk-server kills. At the end of every phase the writer is stopped and checked:
no write failed; every block, read back through another access point, holds its latest
acknowledged version (or a later attempted one); no extent is left converging; and the
replica files (`.dat` and `.sum`) of the members the extent map names are byte-identical.

The RNG is seeded: the seed is printed, and `LUNASTOR_FAULT_SEED=<seed>` replays the same
choices (kinds, victims by role, moments; the machine's timing still varies). The default
suite runs `LUNASTOR_FAULT_ROUNDS` rounds (20); `make soak` runs the same with
`LUNASTOR_SOAK_ROUNDS` (300).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.chunk.test_replicated_cluster import Cluster, _extents, _wait_lun, run
from tests.integration.test_redirector_failover import Journal, stop_writer
from tests.support.devcluster import dev_up, lunastor
from tests.support.procs import wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("iscsi-ls") is None,
    reason="gcc and libiscsi-bin are needed",
)

TOOL = Path(__file__).resolve().parents[2] / "tools" / "verified_writer.c"
INITIATOR = "iqn.2026-11.org.example:fault-rounds"
MIB = 1 << 20
EXTENT = 4 * MIB  # small extents: cheap to compare byte for byte
VOLUME = 32 * MIB  # 8 extents, their primaries spread over the three chunk servers
BLOCKS = 32
STRIDE = VOLUME // BLOCKS  # 4 blocks per extent
KINDS = ("access_point", "primary", "secondary", "meta")
CHUNK_KILLS_PER_PHASE = 2
PROGRESS_TIMEOUT = 90.0  # seconds the writer may go without the progress a round waits for


def _seed() -> int:
    raw = os.environ.get("LUNASTOR_FAULT_SEED")
    return int(raw) if raw else random.SystemRandom().randrange(2**32)


def _metric(admin: str, pattern: str) -> float:
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


@dataclass
class Phase:
    volume: str
    target: str
    lun: int
    out: Path
    err: Path
    stop: Path
    proc: subprocess.Popen[bytes]
    chunk_kills: int = 0


@dataclass
class Rounds:
    cluster: Cluster
    tmp: Path
    rng: random.Random
    writer: Path
    log: list[str] = field(default_factory=list)
    phases: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    # -- observing -------------------------------------------------------------------------

    def admin(self, name: str) -> str:
        return str(self.cluster.state["daemons"][name]["endpoints"]["admin"])

    def access_point(self) -> str | None:
        """The chunk server holding the writer's session, if any (it may be reconnecting)."""
        on = []
        for name in self.cluster.chunks:
            try:
                n = _metric(
                    self.admin(name), r'^lunastor_iscsi_sessions\{type="normal"\} ([0-9.e+]+)$'
                )
            except OSError:
                continue  # down
            if n >= 1:
                on.append(name)
        return on[0] if len(on) == 1 else None

    @staticmethod
    def acks(phase: Phase) -> int:
        return sum(line.startswith("A ") for line in phase.out.read_text().splitlines())

    @staticmethod
    def in_flight(phase: Phase) -> int:
        """The block the writer is writing now (its last `I` line)."""
        for line in reversed(phase.out.read_text().splitlines()):
            if line.startswith("I "):
                return int(line.split()[1])
        return 0

    def wait_acks(self, phase: Phase, count: int, what: str) -> None:
        start = self.acks(phase)
        wait_for(
            lambda: self.acks(phase) >= start + count or phase.proc.poll() is not None,
            PROGRESS_TIMEOUT,
            f"{count} acknowledgements {what}",
            interval=0.1,
        )
        assert phase.proc.poll() is None, f"the writer exited: {phase.err.read_text()}"

    # -- phases ----------------------------------------------------------------------------

    def start_phase(self) -> Phase:
        self.phases += 1
        name = f"rounds{self.phases}"
        vol = self.cluster.create_exported_volume(name, f"{VOLUME // MIB}MiB", INITIATOR)
        target, lun = vol["target_iqn"], vol["lun"]
        vip = self.cluster.state["portal"]
        # the target is the same every phase: wait for this phase's LUN, not just the target
        # (the writer's login raced the export once in a soak: LOGICAL UNIT NOT SUPPORTED)
        wait_for(
            lambda: (
                f"Lun:{lun} "
                in run("iscsi-ls", "-s", "-i", INITIATOR, f"iscsi://{vip}", timeout=20).stdout
            ),
            60,
            "discovery through the VIP to list the new LUN",
        )
        base = self.tmp / name
        out, err, stop = (base.with_suffix(s) for s in (".out", ".err", ".stop"))
        with out.open("w") as stdout, err.open("w") as stderr:
            proc = subprocess.Popen(
                [
                    str(self.writer),
                    f"iscsi://{vip}/{target}/{lun}",
                    INITIATOR,
                    str(BLOCKS),
                    str(STRIDE),
                    str(stop),
                ],
                stdout=stdout,
                stderr=stderr,
            )
        phase = Phase(vol["id"], target, lun, out, err, stop, proc)
        self.wait_acks(phase, BLOCKS, "for the first round of writes")
        return phase

    def end_phase(self, phase: Phase) -> None:
        # A whole round after the last restart: every extent was written (so converged, if a
        # failover left it converging) before the writer stops.
        self.wait_acks(phase, BLOCKS, "after the last round")
        last_ap = self.access_point()
        stop_writer(phase.proc, phase.stop)
        assert phase.proc.returncode == 0, phase.err.read_text()
        journal = Journal.parse(phase.out.read_text())
        assert journal.failed == 0, f"writes failed: {phase.err.read_text()}"
        self.verify_blocks(phase, journal, avoid=last_ap)
        self.verify_replicas(phase)

    def verify_blocks(self, phase: Phase, journal: Journal, avoid: str | None) -> None:
        reader = next(n for n in self.cluster.chunks if n != avoid)
        url = f"iscsi://{self.cluster.portal(reader)}/{phase.target}/{phase.lun}"
        # the reader may have been restarted in the last round and not serve the LUN yet (a
        # soak's read-back login met "Can not reconnect right now")
        _wait_lun(url, INITIATOR)
        got = run(str(self.writer), "--read", url, INITIATOR, str(BLOCKS), str(STRIDE))
        assert got.returncode == 0, got.stderr
        acked = journal.acked()
        assert len(acked) == BLOCKS
        bad = []
        for line in got.stdout.splitlines():
            _, block, version, *rest = line.split()
            b = int(block)
            allowed = {acked[b]} | {w for w in journal.issued[b] if w > acked[b]}
            if version == "bad" or int(version) not in allowed:
                bad.append((b, acked[b], version, rest))
        assert len(got.stdout.splitlines()) == BLOCKS
        assert not bad, f"acknowledged blocks lost, stale or corrupt (via {reader}): {bad}"

    def verify_replicas(self, phase: Phase) -> None:
        extents = _extents(self.cluster.state, phase.volume)
        assert len(extents) == VOLUME // EXTENT
        for index, rec in sorted(extents.items()):
            assert not rec.converging, rec
            digests = {}
            for member in rec.replicas:
                base = (
                    self.cluster.dir
                    / "data"
                    / self.cluster.name_of(member)
                    / "extents"
                    / phase.volume
                    / f"{index:016x}"
                )
                digests[member] = tuple(
                    hashlib.sha256(base.with_suffix(s).read_bytes()).hexdigest()
                    for s in (".dat", ".sum")
                )
            assert len(set(digests.values())) == 1, f"extent {index}: replicas differ {digests}"

    # -- one round -------------------------------------------------------------------------

    def choose(self, kind: str, phase: Phase) -> str | None:
        """The victim for `kind` now, or None when the cluster offers none."""
        if kind == "meta":
            return "meta"
        ap = self.access_point()
        if ap is None:
            return None
        if kind == "access_point":
            return ap
        extents = _extents(self.cluster.state, phase.volume)
        first = self.in_flight(phase)
        # the extent being written, else the next ones the writer is about to write
        for k in [(first + i) % BLOCKS for i in range(BLOCKS)]:
            rec = extents.get(k * STRIDE // EXTENT)
            if rec is None:
                continue
            if kind == "primary" and rec.primary != self.cluster.chunk_id(ap):
                return self.cluster.name_of(rec.primary)
            if kind == "secondary":
                others = [m for m in rec.replicas[1:] if m != self.cluster.chunk_id(ap)]
                if others:
                    return self.cluster.name_of(self.rng.choice(sorted(others)))
        return None

    def round(self, number: int, kind: str, phase: Phase) -> None:
        # a random moment: the writer runs on for a seeded while first
        time.sleep(self.rng.uniform(0.0, 1.5))
        victim = self.choose(kind, phase)
        if victim is None:
            kind = "access_point"
            victim = wait_for(self.access_point, 30, "the writer's session to settle")
        self.counts[kind] += 1
        block = self.in_flight(phase)
        killed = time.monotonic()
        # Half the primary, secondary and meta kills restart the victim at once (a server
        # back before or while its extents fail over); the others, and every access point
        # kill (the writer must move to another server), wait until IO went on without it:
        # every extent saw writes while it was down.
        quick = kind != "access_point" and self.rng.random() < 0.5
        lunastor("dev", "stop", victim, "--kill", "--dir", str(self.cluster.dir))
        if not quick:
            self.wait_acks(phase, BLOCKS, f"after killing {victim} ({kind})")
        if kind == "access_point":  # the writer went on through the VIP on another server
            moved = wait_for(self.access_point, 30, "the writer's session on a live server")
            assert moved != victim
        lunastor("dev", "start", victim, "--dir", str(self.cluster.dir))
        if quick:
            self.wait_acks(phase, BLOCKS, f"after killing and restarting {victim} ({kind})")
        resumed = time.monotonic() - killed
        self.wait_acks(phase, BLOCKS // 4, f"after restarting {victim}")
        if victim != "meta":
            phase.chunk_kills += 1
        self.log.append(
            f"round {number}: {kind} {victim} killed at block {block}"
            f"{', restarted at once' if quick else ''}; a round of writes {resumed:.1f} s later"
        )


@pytest.fixture
def writer(tmp_path: Path) -> Path:
    binary = tmp_path / "verified-writer"
    build = run("gcc", "-O2", "-Wall", "-o", str(binary), str(TOOL), "-liscsi")
    assert build.returncode == 0, build.stderr
    return binary


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    # Two chunk-server kills per phase may leave an extent one member: it must keep
    # acknowledging (until re-replication restores the others).
    monkeypatch.setenv("LUNASTOR_MIN_REPLICAS", "1")
    monkeypatch.setenv("LUNASTOR_EXTENT_SIZE", str(EXTENT))
    directory = tmp_path / "dev"
    state = dev_up(directory, chunks=3, lease_ttl=2.0)
    try:
        yield Cluster(directory, state)
    finally:
        lunastor("dev", "down", "--dir", str(directory), check=False)


def kill_rounds(cluster: Cluster, tmp: Path, writer: Path, rounds: int) -> None:
    seed = _seed()
    print(f"\nfault rounds: seed {seed} (LUNASTOR_FAULT_SEED={seed} replays it), {rounds} rounds")
    rng = random.Random(seed)
    # every kind equally often, in a seeded order
    kinds = [KINDS[i % len(KINDS)] for i in range(rounds)]
    rng.shuffle(kinds)
    r = Rounds(cluster, tmp, rng, writer)
    started = time.monotonic()
    phase = r.start_phase()
    try:
        for number, kind in enumerate(kinds, 1):
            if phase.chunk_kills >= CHUNK_KILLS_PER_PHASE:
                r.end_phase(phase)
                phase = r.start_phase()
            r.round(number, kind, phase)
        r.end_phase(phase)
    except BaseException:
        print("\n".join(r.log))
        print(f"seed {seed}: failed in phase {r.phases}")
        raise
    finally:
        if phase.proc.poll() is None:
            stop_writer(phase.proc, phase.stop)
    print("\n".join(r.log))
    print(
        f"fault rounds: {rounds} rounds ({r.counts}) in {r.phases} phases, "
        f"{time.monotonic() - started:.0f} s, seed {seed}: 0 acknowledged blocks lost"
    )


ROUNDS = int(os.environ.get("LUNASTOR_FAULT_ROUNDS", "20"))
SOAK_ROUNDS = int(os.environ.get("LUNASTOR_SOAK_ROUNDS", "300"))


@pytest.mark.timeout(max(300, 30 * ROUNDS))  # ~8 s a round here; generous on a loaded machine
def test_kill_rounds_lose_no_acknowledged_write(
    cluster: Cluster, tmp_path: Path, writer: Path
) -> None:
    kill_rounds(cluster, tmp_path, writer, ROUNDS)


@pytest.mark.soak
@pytest.mark.timeout(30 * SOAK_ROUNDS)
def test_soak_kill_rounds_lose_no_acknowledged_write(
    cluster: Cluster, tmp_path: Path, writer: Path
) -> None:
    kill_rounds(cluster, tmp_path, writer, SOAK_ROUNDS)
