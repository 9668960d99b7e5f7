"""The data journal of a data directory (docs/extent-format.md, "Journal"), on real files.

A lost page cache is simulated where it matters: the replica's data file and sidecar are
emptied (none of their writes reached the disk) and the store reopens under another boot,
so whatever comes back, comes back from the journal's replay.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from lunastor.chunk.store import BLOCK_SIZE, ExtentStore, Replica, ReplicaState
from lunastor.chunk.store.journal import RECORDS_START, Journal

EXTENT = 256 * 1024
BOOT_A = b"A" * 16
BOOT_B = b"B" * 16


def pattern(seed: int, length: int) -> bytes:
    return (bytes([seed % 251, (seed * 7) % 253, 1]) * (length // 3 + 1))[:length]


def journal_of(store: ExtentStore, r: Replica) -> Journal:
    j = store.journal(r.paths.data_dir)
    assert j is not None
    return j


def lose_extent_writes(r: Replica) -> None:
    """The page cache is lost and none of the replica's data/sidecar writes were on disk."""
    for path in (r.paths.data, r.paths.sums):
        size = path.stat().st_size
        os.truncate(path, 0)
        os.truncate(path, size)


async def reopen_after_power_loss(d: Path, volume: str = "v", extent: int = 0) -> Replica:
    store = ExtentStore([d], EXTENT, boot_id=BOOT_B)
    r = await store.open(volume, extent)
    assert r.state == ReplicaState.STALE  # as ever after a lost page cache: rescan, converge
    await r.checksums()
    return r


async def content(r: Replica) -> bytes:
    data, _ = await r.read_for_copy(0, EXTENT)
    return data


@pytest.fixture
def store(tmp_path: Path) -> ExtentStore:
    return ExtentStore([tmp_path], EXTENT, boot_id=BOOT_A)


async def test_a_flush_is_one_journal_sync_and_replay_restores_flushed_writes(
    store: ExtentStore, tmp_path: Path
) -> None:
    r = await store.create("v", 0, 1)
    j = journal_of(store, r)
    await r.write(0, pattern(1, 3 * BLOCK_SIZE), seq=1, gen=1, fua=False)
    await r.write(5000, pattern(2, 100), seq=2, gen=1, fua=False)  # read-modify-write
    await r.unmap(BLOCK_SIZE, BLOCK_SIZE, seq=3, gen=1, fua=False)
    rounds = j.sync_rounds
    await r.flush()
    assert j.sync_rounds == rounds + 1 and r.durable_seq == 3
    want = await content(r)
    r.abandon()
    lose_extent_writes(r)
    r2 = await reopen_after_power_loss(tmp_path)
    assert (r2.applied_seq, r2.durable_seq) == (3, 3)
    assert await content(r2) == want
    assert want[:BLOCK_SIZE] == pattern(1, BLOCK_SIZE)
    assert want[BLOCK_SIZE : 2 * BLOCK_SIZE] == bytes(BLOCK_SIZE)  # the unmap replayed


async def test_a_torn_tail_is_ignored_and_earlier_records_replayed(
    store: ExtentStore, tmp_path: Path
) -> None:
    r = await store.create("v", 0, 1)
    j = journal_of(store, r)
    await r.write(0, pattern(1, 2 * BLOCK_SIZE), seq=1, gen=1, fua=False)
    await r.write(8 * BLOCK_SIZE, pattern(2, BLOCK_SIZE), seq=2, gen=1, fua=True)
    torn_at = j.tail
    await r.write(16 * BLOCK_SIZE, pattern(3, 4 * BLOCK_SIZE), seq=3, gen=1, fua=False)
    end = j.tail
    r.abandon()
    lose_extent_writes(r)
    # power lost in the middle of the last record: one page of it reached the disk, not
    # the rest (its data's checksums, kept in the record's header, no longer match)
    with open(j.path, "r+b") as f:
        f.seek(torn_at + 4096)
        f.write(bytes(end - torn_at - 4096))
    r2 = await reopen_after_power_loss(tmp_path)
    assert (r2.applied_seq, r2.durable_seq) == (2, 2)
    got = await content(r2)
    assert got[: 2 * BLOCK_SIZE] == pattern(1, 2 * BLOCK_SIZE)
    assert got[8 * BLOCK_SIZE : 9 * BLOCK_SIZE] == pattern(2, BLOCK_SIZE)
    assert got[16 * BLOCK_SIZE : 20 * BLOCK_SIZE] == bytes(4 * BLOCK_SIZE)
    j2 = ExtentStore([tmp_path], EXTENT).journal(str(tmp_path))
    assert j2 is not None and j2.last_replay.records == 0  # started over after the replay


async def test_a_corrupt_record_header_ends_the_replay(store: ExtentStore, tmp_path: Path) -> None:
    r = await store.create("v", 0, 1)
    j = journal_of(store, r)
    await r.write(0, pattern(1, BLOCK_SIZE), seq=1, gen=1, fua=False)
    second = j.tail
    await r.write(BLOCK_SIZE, pattern(2, BLOCK_SIZE), seq=2, gen=1, fua=False)
    await r.write(2 * BLOCK_SIZE, pattern(3, BLOCK_SIZE), seq=3, gen=1, fua=False)
    r.abandon()
    lose_extent_writes(r)
    with open(j.path, "r+b") as f:  # a flipped bit in the second record's offset field
        f.seek(second + 56)
        f.write(b"\x01")
    r2 = await reopen_after_power_loss(tmp_path)
    assert r2.applied_seq == 1  # the third record, valid, comes after a bad one: not used
    got = await content(r2)
    assert got[:BLOCK_SIZE] == pattern(1, BLOCK_SIZE)
    assert got[BLOCK_SIZE : 3 * BLOCK_SIZE] == bytes(2 * BLOCK_SIZE)


async def test_replay_is_idempotent(store: ExtentStore, tmp_path: Path) -> None:
    r = await store.create("v", 0, 1)
    j = journal_of(store, r)
    for seq in range(1, 9):
        await r.write((seq * 3 % 7) * 5000, pattern(seq, 7000), seq=seq, gen=1, fua=False)
    await r.unmap(10000, 9000, seq=9, gen=1, fua=True)
    want = await content(r)
    saved = j.path.read_bytes()
    r.abandon()
    lose_extent_writes(r)
    for _ in range(3):  # replayed, then the same journal again over the replayed files
        j.path.write_bytes(saved)
        r2 = await reopen_after_power_loss(tmp_path)
        assert (r2.applied_seq, await content(r2)) == (9, want)
        r2.abandon()


async def test_a_replay_never_undoes_a_later_delete_and_recreate(
    store: ExtentStore, tmp_path: Path
) -> None:
    r = await store.create("v", 0, 1)
    await r.write(0, pattern(1, 4 * BLOCK_SIZE), seq=1, gen=1, fua=True)
    assert await store.remove("v", 0)
    r = await store.create("v", 0, 7)  # the same name, a new replica
    await r.write(BLOCK_SIZE, pattern(2, BLOCK_SIZE), seq=1, gen=7, fua=True)
    r.abandon()
    lose_extent_writes(r)
    r2 = await reopen_after_power_loss(tmp_path)
    assert (r2.generation, r2.applied_seq) == (7, 1)
    got = await content(r2)
    assert got == bytes(BLOCK_SIZE) + pattern(2, BLOCK_SIZE) + bytes(EXTENT - 2 * BLOCK_SIZE)


async def test_a_replay_never_undoes_a_later_unmap_or_copy(
    store: ExtentStore, tmp_path: Path
) -> None:
    r = await store.create("v", 0, 1)
    await r.write(0, pattern(1, 8 * BLOCK_SIZE), seq=1, gen=1, fua=False)
    await r.unmap(0, 8 * BLOCK_SIZE, seq=2, gen=1, fua=False)  # the whole extent: truncated
    data = pattern(9, 2 * BLOCK_SIZE)
    src = await store.create("src", 0, 1)
    await src.write(0, data, seq=1, gen=1, fua=False)
    copied, sums = await src.read_for_copy(0, 2 * BLOCK_SIZE)
    await r.apply_copy(4 * BLOCK_SIZE, copied, sums)  # a repair's copy, no seq
    await r.flush()
    r.abandon()
    src.abandon()
    lose_extent_writes(r)
    r2 = await reopen_after_power_loss(tmp_path)
    assert r2.applied_seq == 2
    assert await content(r2) == bytes(4 * BLOCK_SIZE) + data + bytes(EXTENT - 6 * BLOCK_SIZE)


async def test_a_lower_applied_seq_at_the_same_generation_survives_a_replay(
    store: ExtentStore, tmp_path: Path
) -> None:
    r = await store.create("v", 0, 3)
    for seq in range(1, 6):
        await r.write(seq * BLOCK_SIZE, pattern(seq, BLOCK_SIZE), seq=seq, gen=3, fua=False)
    await r.set_generation(3, applied_seq=2, state=ReplicaState.SYNCING)  # a rejoin's reset
    r.abandon()
    again = ExtentStore([tmp_path], EXTENT, boot_id=BOOT_A)  # the process died
    r2 = await again.open("v", 0)
    assert (r2.generation, r2.applied_seq, r2.state) == (3, 2, ReplicaState.SYNCING)


async def test_concurrent_flushes_of_many_replicas_share_journal_syncs(
    store: ExtentStore,
) -> None:
    replicas = [await store.create("v", e, 1) for e in range(8)]
    j = journal_of(store, replicas[0])
    rounds = j.sync_rounds
    for rnd in range(1, 4):
        await asyncio.gather(
            *(r.write(0, pattern(rnd, BLOCK_SIZE), seq=rnd, gen=1, fua=True) for r in replicas)
        )
    # 24 FUA writes: a round per batch of waiting flushes, not one per write
    assert j.sync_rounds - rounds <= 8
    assert all(r.durable_seq == 3 for r in replicas)


async def test_checkpoints_start_the_journal_over(tmp_path: Path) -> None:
    store = ExtentStore([tmp_path], EXTENT, boot_id=BOOT_A, checkpoint_bytes=64 * 1024)
    r = await store.create("v", 0, 1)
    j = journal_of(store, r)
    for seq in range(1, 41):
        await r.write((seq % 60) * BLOCK_SIZE, pattern(seq, BLOCK_SIZE), seq=seq, gen=1, fua=True)
        await asyncio.sleep(0)  # the size-triggered checkpoint runs in the background
    for _ in range(100):
        if j.checkpoints >= 2 and not j.busy:
            break
        await asyncio.sleep(0.01)
    assert j.checkpoints >= 2 and j.tail < RECORDS_START + 64 * 1024 + 8 * BLOCK_SIZE
    assert r.durable_seq >= 30  # a checkpoint syncs the header's durable_seq too
    want = await content(r)
    r.abandon()  # power loss now: the checkpointed writes are in the extent files
    r2 = await reopen_after_power_loss(tmp_path)
    assert r2.applied_seq == 40 and await content(r2) == want


async def test_a_closed_store_leaves_an_empty_journal(store: ExtentStore, tmp_path: Path) -> None:
    r = await store.create("v", 0, 1)
    await r.write(0, pattern(1, BLOCK_SIZE), seq=1, gen=1, fua=False)
    await store.close()
    again = ExtentStore([tmp_path], EXTENT, boot_id=BOOT_B)
    [info] = again.list_replicas().replicas
    j = again.journal(str(tmp_path))
    assert j is not None and j.last_replay.records == 0
    assert not info.unclean and info.applied_seq == info.durable_seq == 1


async def test_a_store_without_a_journal_still_works(tmp_path: Path) -> None:
    store = ExtentStore([tmp_path], EXTENT, boot_id=BOOT_A, journal=None)
    r = await store.create("v", 0, 1)
    await r.write(0, pattern(1, BLOCK_SIZE), seq=1, gen=1, fua=True)
    assert not (tmp_path / "journal").exists() and r.durable_seq == 1
    await store.close()
    r2 = await ExtentStore([tmp_path], EXTENT).open("v", 0)
    assert await r2.read(0, BLOCK_SIZE) == pattern(1, BLOCK_SIZE)


async def test_a_large_write_goes_in_place_and_a_flush_syncs_the_data_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PLACED record holds checksums, not data: the journal grows by one page for 64 KiB,
    and the flush syncs the data file beside the journal; after a power loss that kept both
    (and lost the sidecar), the replay gives the blocks their checksums back."""
    store = ExtentStore([tmp_path], EXTENT, boot_id=BOOT_A, placed_bytes=64 * 1024)
    r = await store.create("v", 0, 1)
    j = journal_of(store, r)
    await r.write(0, pattern(1, BLOCK_SIZE), seq=1, gen=1, fua=False)  # a WRITE record
    tail = j.tail
    await r.write(4 * BLOCK_SIZE, pattern(2, 64 * 1024), seq=2, gen=1, fua=False)
    assert j.tail - tail == 4096  # header and 16 checksums, padded to its page
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    await r.flush()
    assert sorted(synced) == sorted([j.fileno(), r._data_fd])
    synced.clear()
    await r.write(BLOCK_SIZE, pattern(3, BLOCK_SIZE), seq=3, gen=1, fua=True)
    assert synced == [j.fileno()]  # nothing written in place since the last flush
    want = await content(r)
    r.abandon()
    size = r.paths.sums.stat().st_size
    os.truncate(r.paths.sums, 0)  # the sidecar's writes were lost; the data file was synced
    os.truncate(r.paths.sums, size)
    r2 = await reopen_after_power_loss(tmp_path)
    assert (r2.applied_seq, r2.durable_seq) == (3, 3)
    assert await content(r2) == want
    assert want[4 * BLOCK_SIZE : 20 * BLOCK_SIZE] == pattern(2, 64 * 1024)


async def test_a_placed_write_that_never_reached_the_disk_does_not_hide_a_flushed_one(
    tmp_path: Path,
) -> None:
    """Power loss after a flushed 4 KiB write (its data only in the journal) and a later
    in-place write over it whose record reached the disk but whose data did not (never
    flushed): the replay finds the in-place blocks without their data and redoes the
    journaled write before it."""
    store = ExtentStore([tmp_path], EXTENT, boot_id=BOOT_A, placed_bytes=64 * 1024)
    r = await store.create("v", 0, 1)
    j = journal_of(store, r)
    await r.write(0, pattern(1, BLOCK_SIZE), seq=1, gen=1, fua=True)  # acknowledged durable
    await r.write(0, pattern(2, 64 * 1024), seq=2, gen=1, fua=False)  # in place, not flushed
    await j.sync()  # its record reached the disk (another replica's flush, or writeback)
    r.abandon()
    lose_extent_writes(r)
    store2 = ExtentStore([tmp_path], EXTENT, boot_id=BOOT_B)
    r2 = await store2.open("v", 0)
    replay = journal_of(store2, r2).last_replay
    assert replay.unplaced == 16
    await r2.checksums()
    got = await content(r2)
    assert got[:BLOCK_SIZE] == pattern(1, BLOCK_SIZE)  # the flushed write
    assert got[BLOCK_SIZE : 16 * BLOCK_SIZE] == bytes(15 * BLOCK_SIZE)


async def test_after_a_process_crash_a_placed_block_is_never_rolled_back(
    tmp_path: Path,
) -> None:
    """Same boot (page cache kept): a block written in place and flushed, then overwritten by
    a write that died before its record was appended, holds the newer data after the replay,
    never the older journaled write's (which a redo would bring back)."""
    store = ExtentStore([tmp_path], EXTENT, boot_id=BOOT_A, placed_bytes=64 * 1024)
    r = await store.create("v", 0, 1)
    await r.write(0, pattern(1, BLOCK_SIZE), seq=1, gen=1, fua=False)  # journaled
    await r.write(0, pattern(2, 64 * 1024), seq=2, gen=1, fua=True)  # in place, flushed
    with open(r.paths.data, "r+b") as f:  # the write in progress when the process died
        f.write(pattern(3, BLOCK_SIZE))
    r.abandon()
    store2 = ExtentStore([tmp_path], EXTENT, boot_id=BOOT_A)
    store2.list_replicas()
    assert journal_of(store2, r).last_replay.unplaced == 1  # block 0: not the PLACED data
    with open(r.paths.data, "rb") as f:
        assert f.read(BLOCK_SIZE) == pattern(3, BLOCK_SIZE)


async def test_a_journaled_write_is_three_pwrites_and_leaves_the_header_alone(
    store: ExtentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per write: its record (one pwritev of the journal), its blocks, its checksums; the
    header file is not written (no intent, no applied_seq) until a flush or a change of
    state, and applied_seq still comes back after a crash (from the records)."""
    r = await store.create("v", 0, 1)
    j = store.journal(r.paths.data_dir)
    assert j is not None
    await r.write(0, pattern(0, BLOCK_SIZE), seq=1, gen=1, fua=False)  # marks DIRTY first
    header = r.paths.header.read_bytes()
    fds = {r._hdr_fd: "header", r._data_fd: "data", r._sum_fd: "sums", j.fileno(): "journal"}
    calls: list[str] = []
    real_pwrite, real_pwritev = os.pwrite, os.pwritev

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        calls.append(fds.get(fd, "other"))
        return real_pwrite(fd, data, offset)

    def pwritev(fd: int, bufs: list[bytes], offset: int) -> int:
        calls.append(fds.get(fd, "other"))
        return real_pwritev(fd, bufs, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "pwritev", pwritev)
    seq = 1
    for offset, data in [
        (BLOCK_SIZE, pattern(1, BLOCK_SIZE)),  # journaled with its data
        (100, pattern(2, 10)),  # read-modify-write
        (4 * BLOCK_SIZE, pattern(3, 20 * BLOCK_SIZE)),  # PLACED: checksums only
    ]:
        seq += 1
        calls.clear()
        await r.write(offset, data, seq=seq, gen=1, fua=False)
        assert sorted(calls) == ["data", "journal", "sums"], (offset, calls)
        seq += 1
        calls.clear()
        assert r.write_now(offset, data, seq=seq, gen=1)
        assert sorted(calls) == ["data", "journal", "sums"], (offset, calls)
    monkeypatch.undo()
    assert r.paths.header.read_bytes() == header
    want = await content(r)
    r.abandon()  # killed: the header still says applied_seq 1
    again = ExtentStore([tmp_path], EXTENT, boot_id=BOOT_A)
    r2 = await again.open("v", 0)
    assert (r2.applied_seq, r2.state) == (seq, ReplicaState.CURRENT)
    assert await r2.read(0, EXTENT) == want
