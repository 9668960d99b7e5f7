"""`python -m bench` (`make bench`): run every benchmark in turn, each against its anchor.

    python -m bench [NAME ...]     # names: iscsi_target, control_plane, extent_store, replicated,
                                   # snapshots

Each benchmark is also its own command (`python -m bench.<name> --help`).
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = {
    "iscsi_target": "the standalone iSCSI target against tgt on the same file",
    "control_plane": "the meta REST API against raw etcd",
    "extent_store": "the local extent store and the chunk data protocol",
    "replicated": "a 3-replica dev-cluster volume against tgt, and re-replication",
    "snapshots": "snapshot/clone create and the copy-on-write write against a normal write",
}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(
            f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}",
            file=sys.stderr,
        )
        return 2
    status = 0
    for name in names:
        print(f"== {name}: {BENCHMARKS[name]}", flush=True)
        status |= subprocess.call([sys.executable, "-m", f"bench.{name}"])
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
