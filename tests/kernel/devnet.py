"""`python -m tests.kernel.devnet DIR PREFIX CHUNKS LEASE_TTL`: the dev cluster, on addresses a
guest can reach.

`lunastor dev up` binds 127.N.x.y loopback addresses, which no packet from a guest's network
card may reach. This runs the very same supervisor (`lunastor.cli.devcluster.run_supervisor`:
etcd, meta, chunk servers, redirector, state file, control socket for `lunastor dev stop`)
with the prefix PREFIX (e.g. 10.78) instead. It is started inside the guest's namespace, where
`ip route add local PREFIX.0.0/16 dev lo` makes every address of the prefix local, the way
127/8 is on loopback; the guest reaches them through the tap. It prints "ready" once every
daemon answers, and runs until SIGTERM.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lunastor.cli.devcluster import Layout, run_supervisor


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: python -m tests.kernel.devnet DIR PREFIX CHUNKS LEASE_TTL", file=sys.stderr)
        return 2
    directory, prefix, chunks, lease_ttl = Path(argv[0]), argv[1], int(argv[2]), float(argv[3])

    def ready(state: dict[str, Any]) -> None:
        print(f"ready {state['portal']}", flush=True)

    return run_supervisor(
        directory,
        Layout(prefix=prefix, chunks=chunks),
        lease_ttl,
        ready,
        lambda message: print(f"dev: {message}", flush=True),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
