"""Local extent-store throughput, and the same through the data protocol on loopback.

    PYTHONPATH=. python -m bench.extent_store [--dir DIR] [--mib 64] [--peer]
    PYTHONPATH=. python -m bench.extent_store --qd1wf 2000 [--rounds 3] [--dir DIR]

Sequential 1 MiB writes over one extent, sequential 1 MiB reads back, then random 4 KiB
writes (aligned, the no-RMW path) and random 512-byte writes (read-modify-write). No fsync
except one flush at the end of each phase, so this measures the Python path on the page cache.
With `--peer`, the same through the data port (`DataServer`, the code chunk servers run) on
loopback: 1 MiB writes and reads and 4 KiB random replica writes, 16 in flight. CPU per op is
the process's CPU time (client and server together, every thread) over the ops: less
sensitive to other load on the machine than op/s.
With `--qd1wf N`, only a lone replica's QD1 4 KiB write + flush (a database commit at one
member; docs/datapath.md), N of them, with the data journal and without it (each flush then
syncs the data file and the sidecar), alternately for `--rounds` rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections.abc import Awaitable, Callable

from lunastor.chunk.replication.replicas import DataService
from lunastor.chunk.store import ExtentStore
from lunastor.chunk.wire.peer import PeerClient
from lunastor.chunk.wire.server import DataServer

MIB = 1024 * 1024


async def timed(label: str, nbytes: int, ops: int, body: Callable[[], Awaitable[None]]) -> None:
    start, cpu = time.perf_counter(), time.process_time()
    await body()
    secs = time.perf_counter() - start
    cpu_us = (time.process_time() - cpu) / ops * 1e6  # client and server: one process
    print(
        f"{label:<36} {nbytes / MIB / secs:9.1f} MiB/s {ops / secs:10.0f} op/s"
        f" {cpu_us:9.0f} us CPU/op"
    )


async def bench_local(directory: str, extent_mib: int) -> None:
    extent = extent_mib * MIB
    store = ExtentStore([directory], extent)
    r = await store.create("bench", 0, 1)
    chunk = b"\xa5" * MIB
    seq = 0

    async def seq_write() -> None:
        nonlocal seq
        for off in range(0, extent, MIB):
            seq += 1
            await r.write(off, chunk, seq=seq, gen=1, fua=False)
        await r.flush()

    async def seq_read() -> None:
        for off in range(0, extent, MIB):
            await r.read(off, MIB)

    rng = random.Random(1)
    n_small = 20000

    async def rand_write(size: int) -> None:
        nonlocal seq
        data = b"\x5a" * size
        for _ in range(n_small):
            seq += 1
            off = rng.randrange(extent // size) * size
            await r.write(off, data, seq=seq, gen=1, fua=False)
        await r.flush()

    await timed("local seq write 1 MiB", extent, extent // MIB, seq_write)
    await timed("local seq read 1 MiB (verified)", extent, extent // MIB, seq_read)
    await timed("local rand write 4 KiB", n_small * 4096, n_small, lambda: rand_write(4096))
    await timed("local rand write 512 B (RMW)", n_small * 512, n_small, lambda: rand_write(512))
    await store.close()


async def bench_peer(directory: str, extent_mib: int) -> None:
    extent = extent_mib * MIB
    store = ExtentStore([directory], extent)
    secret = b"bench-secret-bench-secret-bench!"
    server = DataServer(DataService(store), secret, "bench-server")
    host, port = await server.start("127.0.0.1", 0)
    client = PeerClient(host, port, secret, "bench-client")
    await client.create("peer", 0, 1)
    chunk = b"\xa5" * MIB
    depth = 16

    async def seq_write() -> None:
        offs = list(range(0, extent, MIB))
        for i in range(0, len(offs), depth):
            await asyncio.gather(*(
                client.write("peer", 0, 1, i + j + 1, off, chunk, fua=False)
                for j, off in enumerate(offs[i : i + depth])
            ))  # fmt: skip

    async def seq_read() -> None:
        offs = list(range(0, extent, MIB))
        for i in range(0, len(offs), depth):
            await asyncio.gather(*(client.read("peer", 0, 1, o, MIB) for o in offs[i : i + depth]))

    n_small = 20000
    small = b"\x5a" * 4096
    rng = random.Random(2)
    seq = extent // MIB

    async def rand_write() -> None:
        # replica-level writes (seq >= 1) as a primary forwards them: pipelined, in seq order
        nonlocal seq
        for _ in range(0, n_small, depth):
            batch = []
            for _ in range(depth):
                seq += 1
                off = rng.randrange(extent // 4096) * 4096
                batch.append(client.write("peer", 0, 1, seq, off, small, fua=False))
            await asyncio.gather(*batch)

    await timed("loopback seq write 1 MiB, depth 16", extent, extent // MIB, seq_write)
    await timed("loopback seq read 1 MiB, depth 16", extent, extent // MIB, seq_read)
    await timed("loopback rand write 4 KiB, depth 16", n_small * 4096, n_small, rand_write)
    await client.close()
    await server.close()
    await store.close()


async def bench_qd1wf(directory: str, extent_mib: int, ops: int, journal: bool) -> None:
    extent = extent_mib * MIB
    store = ExtentStore([directory], extent, journal="0" if journal else None)
    r = await store.create("bench", 0, 1)
    rng = random.Random(3)
    data = b"\x5a" * 4096
    seq = 0

    async def body() -> None:
        nonlocal seq
        for _ in range(ops):
            seq += 1
            off = rng.randrange(extent // 4096) * 4096
            await r.write(off, data, seq=seq, gen=1, fua=True)

    label = "QD1 4 KiB write+flush, " + ("journal" if journal else "no journal")
    await timed(label, ops * 4096, ops, body)
    await store.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", help="data directory (default: a temporary one)")
    p.add_argument("--mib", type=int, default=64, help="extent size in MiB")
    p.add_argument("--peer", action="store_true", help="also through the data protocol")
    p.add_argument("--qd1wf", type=int, default=0, help="only QD1 write+flush, this many")
    p.add_argument("--rounds", type=int, default=3, help="--qd1wf: alternating rounds")
    args = p.parse_args()
    if args.qd1wf:
        for _ in range(args.rounds):
            for journal in (False, True):
                with tempfile.TemporaryDirectory(dir=args.dir) as d:
                    asyncio.run(bench_qd1wf(d, args.mib, args.qd1wf, journal))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        asyncio.run(bench_local(d, args.mib))
    if args.peer:
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            asyncio.run(bench_peer(d, args.mib))


if __name__ == "__main__":
    main()
