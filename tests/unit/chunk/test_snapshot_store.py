"""The extent store's chunk-local copy (`ExtentStore.clone`) and garbage removal
(`ExtentStore.remove`), the building blocks of snapshots and clones (docs/snapshots.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lunastor.chunk.store import (
    BLOCK_SIZE,
    ExtentStore,
    ReplicaNotCurrent,
    ReplicaNotFound,
    ReplicaState,
)

EXTENT = 1024 * 1024


@pytest.fixture
def store(tmp_path: Path) -> ExtentStore:
    (tmp_path / "d0").mkdir()
    return ExtentStore([tmp_path / "d0"], EXTENT, boot_id=b"A" * 16)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


async def test_clone_copies_data_and_checksums_and_stays_thin(store: ExtentStore) -> None:
    src = await store.create("vol-a", 0, 3)
    await src.write(0, b"\x11" * BLOCK_SIZE, seq=1, gen=3, fua=False)
    await src.write(EXTENT // 2, b"\x22" * 100, seq=2, gen=3, fua=False)  # read-modify-write
    copy = await store.clone("vol-a", 0, "vol-a.e0", 1)
    assert (copy.volume, copy.extent, copy.generation, copy.applied_seq) == ("vol-a.e0", 0, 1, 0)
    assert copy.state == ReplicaState.CURRENT
    assert await copy.read(0, EXTENT) == await src.read(0, EXTENT)
    assert await copy.checksums() == await src.checksums()
    assert copy.mapped_blocks == src.mapped_blocks == 2
    # holes stay holes: only the two written blocks take space (plus at most a sidecar block)
    assert allocated(copy.paths.data) <= 2 * BLOCK_SIZE + 8192
    # the two diverge independently
    await src.write(0, b"\x33" * BLOCK_SIZE, seq=3, gen=3, fua=False)
    assert await copy.read(0, BLOCK_SIZE) == b"\x11" * BLOCK_SIZE
    await copy.write(BLOCK_SIZE, b"\x44" * BLOCK_SIZE, seq=1, gen=1, fua=False)
    assert await src.read(BLOCK_SIZE, BLOCK_SIZE) == bytes(BLOCK_SIZE)


async def test_clone_again_replaces_an_interrupted_copy(store: ExtentStore) -> None:
    src = await store.create("vol-a", 5, 1)
    await src.write(0, b"\x01" * BLOCK_SIZE, seq=1, gen=1, fua=False)
    first = await store.clone("vol-a", 5, "vol-b", 1)
    await first.write(0, b"\x02" * BLOCK_SIZE, seq=1, gen=1, fua=False)
    again = await store.clone("vol-a", 5, "vol-b", 1)
    assert await again.read(0, BLOCK_SIZE) == b"\x01" * BLOCK_SIZE
    assert again.applied_seq == 0
    assert [r.volume for r in store.list_replicas().replicas] == ["vol-a", "vol-b"]


async def test_clone_of_a_missing_or_stale_replica_is_refused(store: ExtentStore) -> None:
    with pytest.raises(ReplicaNotFound):
        await store.clone("vol-x", 0, "vol-x.e0", 1)
    src = await store.create("vol-s", 0, 1, ReplicaState.STALE)
    with pytest.raises(ReplicaNotCurrent):
        await store.clone("vol-s", 0, "vol-s.e0", 1)
    assert not store.paths(src.paths.data_dir, "vol-s.e0", 0).header.exists()


async def test_remove_deletes_every_file_and_is_idempotent(store: ExtentStore) -> None:
    r = await store.create("vol-a", 1, 1)
    await r.write(0, b"\x05" * BLOCK_SIZE, seq=1, gen=1, fua=True)
    paths = r.paths
    assert await store.remove("vol-a", 1) is True
    assert not any(p.exists() for p in (paths.header, paths.data, paths.sums))
    assert not paths.header.parent.exists()  # the volume's last replica: directory gone too
    assert await store.remove("vol-a", 1) is False
    with pytest.raises(ReplicaNotFound):
        await store.open("vol-a", 1)


async def test_remove_of_a_replica_with_a_damaged_header(store: ExtentStore) -> None:
    r = await store.create("vol-a", 2, 1)
    paths = r.paths
    await r.close()
    paths.header.write_bytes(b"garbage")
    assert await store.remove("vol-a", 2) is True
    assert not paths.data.exists() and not paths.header.exists()
