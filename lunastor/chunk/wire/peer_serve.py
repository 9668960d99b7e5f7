"""A bare data-protocol server over one extent store: `python -m lunastor.chunk.wire.peer_serve`.

For tests and benchmarks of the replication layer without a full chunk server (no etcd, no
iSCSI): the same `DataServer` as a chunk server's data port, over a plain `DataService`.
Prints `listening HOST:PORT` once it accepts connections; stops on SIGTERM/SIGINT, closing
every replica cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from lunastor.chunk.replication.replicas import DataService
from lunastor.chunk.store import DEFAULT_EXTENT_SIZE, ExtentStore
from lunastor.chunk.wire.server import DataServer


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lunastor.chunk.wire.peer_serve")
    p.add_argument("--data-dir", action="append", required=True)
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free)")
    p.add_argument("--secret-file", required=True)
    p.add_argument("--node", default="peer")
    p.add_argument("--extent-size", type=int, default=DEFAULT_EXTENT_SIZE)
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    with open(args.secret_file, "rb") as f:
        secret = f.read().strip()
    store = ExtentStore(args.data_dir, args.extent_size)
    listing = store.list_replicas()
    for problem in listing.problems:
        print(f"problem: {problem.path}: {problem.reason}", file=sys.stderr)
    server = DataServer(DataService(store), secret, args.node)
    host, _, port = args.listen.rpartition(":")
    bound = await server.start(host, int(port))
    print(f"listening {bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    await store.close()


def main(argv: Sequence[str] | None = None) -> None:
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
