"""`python -m tests.fault.guarded_child ENDPOINT NAMESPACE KEY TTL [keep]`: a stand-in for a
chunk server's presence, for tests/fault/test_crash_guard.py: it holds `KEY` under a lease of
`TTL` seconds, kept alive, with a crash guard told about the lease (`keep`: told to forget it
again), prints "ready" and waits to be killed. The guard is the real one (lunastor.chunk.guard).
"""

from __future__ import annotations

import asyncio
import sys

from lunastor.chunk.guard import CrashGuard
from lunastor.common.etcd import Etcd, EtcdConfig


async def main(endpoint: str, namespace: str, key: str, ttl: int, keep: bool) -> None:
    config = EtcdConfig(endpoints=[endpoint], namespace=namespace, timeout=5)
    async with await Etcd.connect(config) as etcd:
        guard = await CrashGuard(config).start()
        lease = await etcd.grant(ttl)
        await etcd.put(key, b"alive", lease=lease)
        guard.lease(lease, ttl)
        if keep:
            guard.keep()
        print(f"ready {lease:x}", flush=True)
        while True:
            await asyncio.sleep(3600)


if __name__ == "__main__":
    endpoint, namespace, key, ttl, *rest = sys.argv[1:]
    asyncio.run(main(endpoint, namespace, key, int(ttl), rest == ["keep"]))
