"""Waiting until every chunk server's data path has seen a metadata change (docs/snapshots.md).

A snapshot bumps its volume's epoch; from then on the extents' primaries must copy frozen data
aside before writing. A primary learns the epoch from its watch of `/v1/volumes/`, which may
lag, so a snapshot is only answered once every live chunk server has published (at
`Keys.live_seen`) a volumes revision at least the snapshot's: a write acknowledged after the
answer can then never land in the frozen data. A chunk server that is not live cannot
acknowledge writes (its lease is gone), so it is not waited for; nor is one that never
published (it runs no data path). A chunk server publishes once before its data port opens.
"""

from __future__ import annotations

import asyncio
import time

from lunastor.common.etcd import Etcd
from lunastor.common.records import Keys
from lunastor.meta.problems import Problem

FENCE_TIMEOUT = 15.0


async def lagging(etcd: Etcd, revision: int) -> list[str]:
    """Live chunk servers whose data path has not seen `revision` yet."""
    live, _ = await etcd.get_prefix(Keys.LIVE_CHUNKS)
    seen, _ = await etcd.get_prefix(Keys.LIVE_SEEN)
    at: dict[str, int] = {}
    for kv in seen:
        try:
            at[kv.key.removeprefix(Keys.LIVE_SEEN)] = int(kv.value)
        except ValueError:
            continue
    ids = [kv.key.removeprefix(Keys.LIVE_CHUNKS) for kv in live]
    # A server that never published runs no data path (no cluster secret): it serves no IO.
    return [c for c in ids if c in at and at[c] < revision]


async def wait_data_path(etcd: Etcd, revision: int, timeout: float | None = None) -> None:
    deadline = time.monotonic() + (FENCE_TIMEOUT if timeout is None else timeout)
    delay = 0.02
    while True:
        behind = await lagging(etcd, revision)
        if not behind:
            return
        if time.monotonic() > deadline:
            raise Problem(
                503,
                "data_path_unavailable",
                f"chunk servers {', '.join(behind)} have not seen revision {revision}; retry",
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)
