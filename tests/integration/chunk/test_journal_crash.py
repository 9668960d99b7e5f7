"""The data journal under kill -9 (docs/extent-format.md, "Journal"): a child process
writes and flushes at QD1 through a real store and is killed at arbitrary moments, and at
the start of or right after a journal fdatasync (between an append and its sync, between
the sync and the next checkpoint). Every write whose flush returned must come back
byte-exact, and nothing torn may be served.

Two ways back: the same boot (page cache kept: the process died), and a power loss in its
worst case for the journal, where none of the extent files' writes since the replica was
created reached the disk (the data file and sidecar are emptied), so only the journal's
replay can bring the flushed writes back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lunastor.chunk.store import BLOCK_SIZE, ExtentStore, ReplicaState
from tests.integration.chunk.crash_writer import EXTENT, op
from tests.integration.chunk.test_extent_store_faults import REPO, _apply, _model


def run_child(
    data_dir: Path, checkpoint_bytes: int, kill: str, stop_after: int, *placed: str
) -> int:
    """The last seq acknowledged as durable (its flush returned) before the child died.
    `placed`: the writer's PLACED_BYTES and SYNCED arguments (journal_crash_writer.py)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "tests.integration.chunk.journal_crash_writer",
            str(data_dir), str(checkpoint_bytes), kill, *placed,
        ],
        stdout=subprocess.PIPE, env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.stdout is not None
    last = 0
    try:
        while True:
            line = proc.stdout.readline()
            if not line:
                break  # it killed itself
            last = int(line)
            if last >= stop_after:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    return last


def empty_extent_files(data_dir: Path) -> None:
    """Every write to the data file and the sidecar since create lost (still sparse)."""
    base = data_dir / "extents" / "crash" / f"{0:016x}"
    for suffix in (".dat", ".sum"):
        path = base.with_suffix(suffix)
        size = path.stat().st_size
        os.truncate(path, 0)
        os.truncate(path, size)


async def check(data_dir: Path, acked: int, power_loss: bool) -> int:
    store = ExtentStore([data_dir], EXTENT, boot_id=os.urandom(16) if power_loss else None)
    replica = await store.open("crash", 0)
    applied = replica.applied_seq
    assert applied >= acked, f"acknowledged {acked}, came back with {applied}"
    if power_loss:
        assert replica.state == ReplicaState.STALE and replica.durable_seq == applied
        await replica.checksums()  # the rescan a STALE replica gets before it is compared
        got, _ = await replica.read_for_copy(0, EXTENT)
    else:
        assert replica.state == ReplicaState.CURRENT
        got = await replica.read(0, EXTENT)  # raises ChecksumMismatch if anything is torn
    old, _ = _model(applied)
    new = bytearray(old)
    _apply(new, [False] * (EXTENT // BLOCK_SIZE), applied + 1)
    for b in range(EXTENT // BLOCK_SIZE):
        block = got[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE]
        assert block in (
            old[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE],
            new[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE],
        ), f"block {b} after applied_seq {applied} (acknowledged {acked})"
    await store.close()
    return applied


# (checkpoint size, kill point, stop after): no checkpoint at all (the journal holds every
# write), or one every ~48 KiB of records (many during the run)
CASES = [
    (1 << 30, "none", 37),
    (1 << 30, "none", 151),
    (1 << 30, "before-sync:23", 10**9),
    (1 << 30, "after-sync:61", 10**9),
    (48 * 1024, "before-sync:90", 10**9),
    (48 * 1024, "after-sync:17", 10**9),
    (48 * 1024, "none", 203),
]


@pytest.mark.parametrize(("checkpoint_bytes", "kill", "stop_after"), CASES)
async def test_kill_9_same_boot_loses_no_flushed_write(
    tmp_path: Path, checkpoint_bytes: int, kill: str, stop_after: int
) -> None:
    acked = run_child(tmp_path, checkpoint_bytes, kill, stop_after)
    assert acked > 5
    await check(tmp_path, acked, power_loss=False)


@pytest.mark.parametrize(("kill", "stop_after"), [c[1:] for c in CASES if c[0] == 1 << 30])
async def test_kill_9_then_lost_extent_writes_replays_every_flushed_write(
    tmp_path: Path, kill: str, stop_after: int
) -> None:
    acked = run_child(tmp_path, 1 << 30, kill, stop_after)
    assert acked > 5
    empty_extent_files(tmp_path)
    applied = await check(tmp_path, acked, power_loss=True)
    # and a second restart replays nothing (the journal started over after the replay)
    store = ExtentStore([tmp_path], EXTENT)
    store.list_replicas()
    journal = store.journal(str(tmp_path))
    assert journal is not None and journal.last_replay.records == 0
    assert (await store.open("crash", 0)).applied_seq == applied
    await store.close()


@pytest.mark.parametrize("nth", [40, 77])
@pytest.mark.parametrize("placed", [EXTENT + 1, 16 * 1024])
async def test_kill_9_between_a_record_and_its_blocks(
    tmp_path: Path, nth: int, placed: int
) -> None:
    """Killed at a data pwrite: the write's record is in the journal (appended before its
    blocks) and no header was written for it. A write journaled with its data is finished
    by the replay, so applied_seq comes back past it (from the journal: the header does not
    hold it); a PLACED write cut short is not applied, its blocks are as they were."""
    acked = run_child(tmp_path, 1 << 30, f"in-place:{nth}", 10**9, str(placed))
    assert acked > 5
    applied = await check(tmp_path, acked, power_loss=False)
    kind, _, length, _ = op(acked + 1)
    if kind == "write" and placed > EXTENT:
        assert applied == acked + 1
    elif kind == "write" and length >= placed:
        assert applied == acked
    else:
        assert applied in (acked, acked + 1)


# Writes of 16 KiB or more (after the read-modify-write of their edge blocks) go in place
# with a PLACED record: about two thirds of the writer's writes, mixed with journaled ones
PLACED_BYTES = 16 * 1024


@pytest.mark.parametrize(("checkpoint_bytes", "kill", "stop_after"), CASES)
async def test_kill_9_same_boot_with_placed_writes_loses_no_flushed_write(
    tmp_path: Path, checkpoint_bytes: int, kill: str, stop_after: int
) -> None:
    acked = run_child(tmp_path, checkpoint_bytes, kill, stop_after, str(PLACED_BYTES))
    assert acked > 5
    await check(tmp_path, acked, power_loss=False)


@pytest.mark.parametrize(("kill", "stop_after"), [c[1:] for c in CASES if c[0] == 1 << 30])
async def test_power_loss_with_placed_writes_keeps_every_flushed_write(
    tmp_path: Path, kill: str, stop_after: int
) -> None:
    """The worst a power loss leaves with blocks written in place: the data file as it was
    at its last fdatasync (a flush syncs it beside the journal), the sidecar as created
    (none of its writes reached the disk). The replay puts back each block's checksum from
    the PLACED record whose data the block holds, or else redoes the record before it (a
    PLACED write whose data is missing was never flushed): every block holds the data of a
    write at or after the last acknowledged one, never older."""
    synced = tmp_path.parent / f"{tmp_path.name}.synced"
    acked = run_child(tmp_path, 1 << 30, kill, stop_after, str(PLACED_BYTES), str(synced))
    assert acked > 5
    base = tmp_path / "extents" / "crash" / f"{0:016x}"
    data, sums = base.with_suffix(".dat"), base.with_suffix(".sum")
    size, sums_size = data.stat().st_size, sums.stat().st_size
    if synced.exists():
        os.replace(synced, data)
    else:
        os.truncate(data, 0)
    os.truncate(data, size)
    os.truncate(sums, 0)
    os.truncate(sums, sums_size)
    store = ExtentStore([tmp_path], EXTENT, boot_id=os.urandom(16))
    replica = await store.open("crash", 0)
    applied = replica.applied_seq
    assert applied >= acked, f"acknowledged {acked}, came back with {applied}"
    assert replica.state == ReplicaState.STALE and replica.durable_seq == applied
    await replica.checksums()  # the rescan a STALE replica gets before it is compared
    got, _ = await replica.read_for_copy(0, EXTENT)
    states = [_model(k)[0] for k in range(acked, applied + 2)]
    for b in range(EXTENT // BLOCK_SIZE):
        block = got[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE]
        assert any(block == st[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE] for st in states), (
            f"block {b}: older than acknowledged write {acked} (came back at {applied})"
        )
    await store.close()
