"""Child process for the kill -9 test: applies a deterministic stream of writes and unmaps.

Run as `python -m tests.integration.chunk.crash_writer DATA_DIR`; prints each applied seq.
"""

from __future__ import annotations

import asyncio
import sys

from lunastor.chunk.store import BLOCK_SIZE, ExtentStore

EXTENT = 1024 * 1024


def op(seq: int) -> tuple[str, int, int, int]:
    """(kind, offset, length, fill) of operation `seq`: the same in the child and the test."""
    length = 1 + (seq * 104729) % (12 * BLOCK_SIZE)
    offset = (seq * 7919 * 13) % (EXTENT - length)
    kind = "unmap" if seq % 5 == 0 else "write"
    return kind, offset, length, 1 + seq % 255


async def run(data_dir: str) -> None:
    store = ExtentStore([data_dir], EXTENT)
    store.list_replicas()
    replica = await store.create("crash", 0, 1)
    seq = 0
    while True:
        seq += 1
        kind, offset, length, fill = op(seq)
        if kind == "write":
            await replica.write(offset, bytes([fill]) * length, seq=seq, gen=1, fua=seq % 50 == 0)
        else:
            await replica.unmap(offset, length, seq=seq, gen=1, fua=False)
        sys.stdout.write(f"{seq}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1]))
