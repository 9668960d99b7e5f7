"""Upgrade: a data directory written by the previous release's extent store (commit 7de4b0a,
format version 1; made by data/make_store_7de4b0a.py) opens, recovers and serves with today's.

Three replicas: closed cleanly, left dirty by a killed process, and killed between the data
and the checksum of a write (the header names the intent). Each is opened as after a process
restart (same boot id) and the dirty ones also as after a reboot (another boot id)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from lunastor.chunk.store import BLOCK_SIZE, ExtentStore, ReplicaState
from lunastor.chunk.store.header import FORMAT_VERSION, decode_file

FIXTURE = Path(__file__).parent / "data" / "store-7de4b0a.tar.gz"
EXTENT = 32 * 1024
BOOT_A = b"A" * 16  # the boot the fixture was written in
BOOT_B = b"B" * 16


def pattern(seed: int, length: int) -> bytes:  # as in make_store_7de4b0a.py
    return (bytes([seed % 251, (seed * 7) % 253]) * (length // 2 + 1))[:length]


@pytest.fixture
def old_dir(tmp_path: Path) -> Path:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "d0"


def expected_clean() -> bytes:
    data = bytearray(EXTENT)
    data[0 : 2 * BLOCK_SIZE] = pattern(1, 2 * BLOCK_SIZE)
    data[5000:5100] = pattern(2, 100)
    data[7 * BLOCK_SIZE :] = pattern(5, BLOCK_SIZE)  # block 3 was written, then unmapped
    return bytes(data)


async def test_the_previous_release_wrote_version_1(old_dir: Path) -> None:
    h, _ = decode_file((old_dir / "extents" / "vol-up" / f"{0:016x}.hdr").read_bytes())
    assert h.version == 1 == FORMAT_VERSION  # when this changes, the reader must keep v1


async def test_listing_finds_every_old_replica(old_dir: Path) -> None:
    listing = ExtentStore([old_dir], EXTENT, boot_id=BOOT_A).list_replicas()
    assert listing.problems == [] and listing.failed_dirs == []
    got = {
        (i.extent, i.generation, i.applied_seq, i.durable_seq, i.unclean) for i in listing.replicas
    }
    assert got == {(0, 3, 5, 5, False), (1, 2, 2, 1, True), (2, 1, 2, 2, True)}


async def test_a_cleanly_closed_old_replica_serves_and_takes_writes(old_dir: Path) -> None:
    store = ExtentStore([old_dir], EXTENT, boot_id=BOOT_B)  # a reboot does not matter: clean
    r = await store.open("vol-up", 0)
    assert (r.generation, r.applied_seq, r.state) == (3, 5, ReplicaState.CURRENT)
    assert r.recovered_blocks == [] and not r.needs_rescan
    assert await r.read(0, EXTENT) == expected_clean()
    assert r.mapped_runs(0, EXTENT) == [
        (0, 2 * BLOCK_SIZE, True),
        (2 * BLOCK_SIZE, 5 * BLOCK_SIZE, False),
        (7 * BLOCK_SIZE, BLOCK_SIZE, True),
    ]
    await r.write(100, b"new", seq=6, gen=3, fua=True)
    await store.close()
    again = ExtentStore([old_dir], EXTENT, boot_id=BOOT_B)
    r2 = await again.open("vol-up", 0)
    want = bytearray(expected_clean())
    want[100:103] = b"new"
    assert (r2.applied_seq, r2.durable_seq) == (6, 6)
    assert await r2.read(0, EXTENT) == bytes(want)
    await again.close()


async def test_an_old_replica_of_a_killed_process_resumes(old_dir: Path) -> None:
    store = ExtentStore([old_dir], EXTENT, boot_id=BOOT_A)
    r = await store.open("vol-up", 1)
    assert (r.applied_seq, r.state, r.recovered_blocks) == (2, ReplicaState.CURRENT, [])
    assert await r.read(0, 2 * BLOCK_SIZE) == pattern(11, BLOCK_SIZE) + pattern(12, BLOCK_SIZE)
    await r.write(2 * BLOCK_SIZE, pattern(13, BLOCK_SIZE), seq=3, gen=2, fua=False)
    assert await r.read(2 * BLOCK_SIZE, BLOCK_SIZE) == pattern(13, BLOCK_SIZE)
    await store.close()


async def test_an_old_intent_is_rehashed_and_the_write_resent(old_dir: Path) -> None:
    store = ExtentStore([old_dir], EXTENT, boot_id=BOOT_A)
    r = await store.open("vol-up", 2)
    assert r.recovered_blocks == [2]  # new data under the old checksum: re-hashed
    assert r.applied_seq == 2  # write 3 was never applied: the primary sends it again
    assert await r.read(2 * BLOCK_SIZE, BLOCK_SIZE) == pattern(23, BLOCK_SIZE)
    await r.write(2 * BLOCK_SIZE, pattern(24, BLOCK_SIZE), seq=3, gen=1, fua=True)
    assert await r.read(0, 3 * BLOCK_SIZE) == pattern(21, 2 * BLOCK_SIZE) + pattern(24, BLOCK_SIZE)
    await store.close()


@pytest.mark.parametrize("extent", [1, 2])
async def test_old_dirty_replicas_after_a_reboot_are_fenced_and_rescanned(
    old_dir: Path, extent: int
) -> None:
    store = ExtentStore([old_dir], EXTENT, boot_id=BOOT_B)
    r = await store.open("vol-up", extent)
    assert r.state == ReplicaState.STALE and r.needs_rescan
    assert r.applied_seq == r.durable_seq  # fell back to what the old header said was synced
    sums = await r.checksums()  # rescans: the array then describes the data on disk
    assert not r.needs_rescan
    last = 2 if extent == 2 else 1  # the last block written: mapped
    assert sums[last * 8 : (last + 1) * 8] != bytes(8)
    assert r.recovered_blocks == [] and (await r.rescan()) == []
    await r.set_generation(r.generation + 1, state=ReplicaState.CURRENT)
    data = await r.read(0, 3 * BLOCK_SIZE)
    if extent == 1:
        assert data[: 2 * BLOCK_SIZE] == pattern(11, BLOCK_SIZE) + pattern(12, BLOCK_SIZE)
    else:
        assert data == pattern(21, 2 * BLOCK_SIZE) + pattern(23, BLOCK_SIZE)
    await store.close()


# The release before the header's per-write slots went (commit ffabcbb, with the data journal;
# made by data/make_store_ffabcbb.py): killed with its journal full of records.
FIXTURE_FFABCBB = Path(__file__).parent / "data" / "store-ffabcbb.tar.gz"


@pytest.fixture
def journal_dir(tmp_path: Path) -> Path:
    with tarfile.open(FIXTURE_FFABCBB) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "d0"


async def test_a_killed_store_of_the_release_with_header_writes_per_write_resumes(
    journal_dir: Path,
) -> None:
    store = ExtentStore([journal_dir], EXTENT, boot_id=BOOT_A, placed_bytes=2 * BLOCK_SIZE)
    listing = store.list_replicas()
    assert listing.problems == []
    got = {(i.extent, i.generation, i.applied_seq, i.unclean) for i in listing.replicas}
    assert got == {(0, 3, 5, False), (1, 2, 3, True), (2, 1, 2, True)}
    r0, r1, r2 = [await store.open("vol-up", e) for e in range(3)]
    assert await r0.read(0, EXTENT) == expected_clean()
    assert await r1.read(0, 6 * BLOCK_SIZE) == (
        pattern(11, BLOCK_SIZE) + pattern(12, BLOCK_SIZE) + bytes(2 * BLOCK_SIZE)
        + pattern(13, 2 * BLOCK_SIZE)
    )  # fmt: skip
    # write 3 died in place after write 2's PLACED record: block 2 re-hashed as it is
    journal = store.journal(str(journal_dir))
    assert journal is not None and journal.last_replay.rehashed == 1
    assert await r2.read(0, 3 * BLOCK_SIZE) == (
        pattern(21, BLOCK_SIZE) + pattern(22, BLOCK_SIZE) + pattern(23, BLOCK_SIZE)
    )
    # today's writes (no header slot per write), a kill, and the journal brings them back
    await r1.write(2 * BLOCK_SIZE, pattern(14, BLOCK_SIZE), seq=4, gen=2, fua=False)
    await r2.write(2 * BLOCK_SIZE, pattern(24, BLOCK_SIZE), seq=3, gen=1, fua=False)
    for r in (r1, r2):
        r.abandon()
    again = ExtentStore([journal_dir], EXTENT, boot_id=BOOT_A)
    r1, r2 = [await again.open("vol-up", e) for e in (1, 2)]
    assert (r1.applied_seq, r2.applied_seq) == (4, 3)
    assert await r1.read(2 * BLOCK_SIZE, BLOCK_SIZE) == pattern(14, BLOCK_SIZE)
    assert await r2.read(2 * BLOCK_SIZE, BLOCK_SIZE) == pattern(24, BLOCK_SIZE)
    await again.close()
    await store.close()


async def test_a_killed_store_of_the_release_with_header_writes_per_write_after_a_reboot(
    journal_dir: Path,
) -> None:
    store = ExtentStore([journal_dir], EXTENT, boot_id=BOOT_B)
    for extent in (1, 2):
        r = await store.open("vol-up", extent)
        assert r.state == ReplicaState.STALE and r.needs_rescan
        assert r.applied_seq == r.durable_seq
        await r.checksums()
        await r.set_generation(r.generation + 1, state=ReplicaState.CURRENT)
        await r.read(0, EXTENT)  # every block verifies
    await store.close()
