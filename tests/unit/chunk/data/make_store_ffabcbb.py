"""Writes the data directory of `store-ffabcbb.tar.gz` (tests/unit/chunk/test_store_upgrade.py)
with the extent store of commit ffabcbb: the data journal, and the header's intent and
applied_seq slots written per write (the release before they went). Run it with that
commit's `lunastor` package first on the path, never today's:

    git archive ffabcbb lunastor | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python tests/unit/chunk/data/make_store_ffabcbb.py OUT.tar.gz

Three replicas of volume `vol-up` (extent size 32 KiB, 8 blocks), boot id b"A" * 16, then the
process is killed (no close of the store: its journal keeps every record):
  0  closed cleanly after whole-block, sub-block (read-modify-write), unmap and PLACED writes;
  1  left DIRTY after a flushed write, an unflushed one and an unflushed PLACED one;
  2  left DIRTY by a process killed between the data and the checksum of write 3: its header
     names the intent, block 2 holds new data under the old checksum (write 2's PLACED
     record covers block 2, which does not hold its data: the block is re-hashed as is).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tarfile
import tempfile
from pathlib import Path

from lunastor.chunk.store import ExtentStore
from lunastor.chunk.store.header import SLOT_SIZE, decode_file, encode_slot

EXTENT = 32 * 1024
BLOCK = 4096
BOOT = b"A" * 16


def pattern(seed: int, length: int) -> bytes:  # as in test_store_upgrade.py
    return (bytes([seed % 251, (seed * 7) % 253]) * (length // 2 + 1))[:length]


async def make(root: Path) -> None:
    store = ExtentStore(
        [root], EXTENT, boot_id=BOOT, checkpoint_interval=3600, placed_bytes=2 * BLOCK
    )
    store.list_replicas()
    r0 = await store.create("vol-up", 0, 3)
    await r0.write(0, pattern(1, 2 * BLOCK), seq=1, gen=3, fua=False)  # PLACED
    await r0.write(5000, pattern(2, 100), seq=2, gen=3, fua=True)
    await r0.write(3 * BLOCK, pattern(3, BLOCK), seq=3, gen=3, fua=False)
    await r0.unmap(3 * BLOCK, BLOCK, seq=4, gen=3, fua=False)
    await r0.write(7 * BLOCK, pattern(5, BLOCK), seq=5, gen=3, fua=False)
    await r0.close()

    r1 = await store.create("vol-up", 1, 2)
    await r1.write(0, pattern(11, BLOCK), seq=1, gen=2, fua=True)
    await r1.write(BLOCK, pattern(12, BLOCK), seq=2, gen=2, fua=False)
    await r1.write(4 * BLOCK, pattern(13, 2 * BLOCK), seq=3, gen=2, fua=False)  # PLACED
    r1.abandon()  # killed: DIRTY, no intent

    r2 = await store.create("vol-up", 2, 1)
    await r2.write(0, pattern(21, BLOCK), seq=1, gen=1, fua=False)
    await r2.write(BLOCK, pattern(22, 2 * BLOCK), seq=2, gen=1, fua=True)  # PLACED
    paths = r2.paths
    r2.abandon()
    # killed inside write 3 (block 2): intent recorded, new data written, checksum not yet
    h, slot = decode_file(paths.header.read_bytes())
    with open(paths.header, "r+b") as f:
        f.seek((1 - slot) * SLOT_SIZE)
        f.write(
            encode_slot(
                h.evolve(counter=h.counter + 1, intent_offset=2 * BLOCK, intent_length=BLOCK)
            )
        )
    with open(paths.data, "r+b") as f:
        f.seek(2 * BLOCK)
        f.write(pattern(23, BLOCK))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "d0"
        root.mkdir()
        asyncio.run(make(root))
        with tarfile.open(sys.argv[1], "w:gz") as tar:
            tar.add(root, arcname="d0")
        sys.stdout.flush()
        os._exit(0)  # killed: no store close, no checkpoint


if __name__ == "__main__":
    main()
