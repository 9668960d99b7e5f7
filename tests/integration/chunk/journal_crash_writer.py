"""Child process for the journal's kill -9 tests: a QD1 stream of writes and unmaps, each
flushed (a database commit), through a real store with its journal.

Run as `python -m tests.integration.chunk.journal_crash_writer DATA_DIR CHECKPOINT_BYTES
KILL [PLACED_BYTES [SYNCED]]`; prints each seq once its flush has returned (acknowledged as
durable). KILL is "none", "before-sync:N", "after-sync:N" or "in-place:N": the process
SIGKILLs itself at the start of, or right after, the Nth fdatasync of its journal (between
an append and its sync, or between the sync and the next checkpoint), or at the Nth pwrite
of the data file (a write's record appended, its blocks not written in place yet).
PLACED_BYTES: the store's threshold for writing blocks in place with a PLACED record.
SYNCED: a path where a copy of the data file is kept as it was at its last fdatasync (what
a power loss must keep of it), for the test to put back.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from collections.abc import Callable

from lunastor.chunk.store import ExtentStore
from tests.integration.chunk.crash_writer import EXTENT, op


def kill_at(
    kill: str, journal_fd: Callable[[], int], data_fd: int = -1, data: str = "", synced: str = ""
) -> None:
    where, count = kill.split(":") if kill != "none" else ("none", "0")
    real = os.fdatasync
    seen = 0

    def fdatasync(fd: int) -> None:
        nonlocal seen
        if fd == data_fd and synced:
            real(fd)
            # What the disk holds now (at least): copied after the sync, so it may hold later
            # writes too, as a disk may
            shutil.copyfile(data, synced + ".tmp")
            os.replace(synced + ".tmp", synced)
            return None
        if fd != journal_fd():
            return real(fd)
        seen += 1
        if seen == int(count) and where == "before-sync":
            os.kill(os.getpid(), signal.SIGKILL)
        real(fd)
        if seen == int(count) and where == "after-sync":
            os.kill(os.getpid(), signal.SIGKILL)
        return None

    os.fdatasync = fdatasync  # the journal calls os.fdatasync by name, on the thread pool
    if where != "in-place":
        return
    real_pwrite = os.pwrite
    writes = 0

    def pwrite(fd: int, buf: bytes, offset: int) -> int:
        nonlocal writes
        if fd == data_fd:
            writes += 1
            if writes == int(count):
                os.kill(os.getpid(), signal.SIGKILL)
        return real_pwrite(fd, buf, offset)

    os.pwrite = pwrite  # the store's pwrite_all calls os.pwrite by name


async def run(
    data_dir: str, checkpoint_bytes: int, kill: str, placed_bytes: int, synced: str
) -> None:
    store = ExtentStore(
        [data_dir],
        EXTENT,
        checkpoint_bytes=checkpoint_bytes,
        checkpoint_interval=3600,
        placed_bytes=placed_bytes,
    )
    store.list_replicas()
    journal = store.journal(data_dir)
    assert journal is not None
    replica = await store.create("crash", 0, 1)
    kill_at(kill, journal.fileno, replica._data_fd, str(replica.paths.data), synced)
    seq = 0
    while True:
        seq += 1
        kind, offset, length, fill = op(seq)
        if kind == "write":
            await replica.write(offset, bytes([fill]) * length, seq=seq, gen=1, fua=True)
        else:
            await replica.unmap(offset, length, seq=seq, gen=1, fua=True)
        sys.stdout.write(f"{seq}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    placed = int(sys.argv[4]) if len(sys.argv) > 4 else EXTENT + 1  # default: never in place
    asyncio.run(run(sys.argv[1], int(sys.argv[2]), sys.argv[3], placed, (sys.argv[5:] or [""])[0]))
