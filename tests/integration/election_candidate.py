"""A candidate in its own process: campaigns, says LEADER on stdout, then holds on.

Usage: python -m tests.integration.election_candidate ENDPOINT NAMESPACE NAME VALUE TTL
"""

from __future__ import annotations

import asyncio
import sys

from lunastor.common.etcd import Election, Etcd, EtcdConfig, LeaseKeeper


async def main(endpoint: str, namespace: str, name: str, value: str, ttl: int) -> None:
    config = EtcdConfig([endpoint], namespace=namespace, timeout=2)
    async with await Etcd.connect(config) as etcd, LeaseKeeper(config, ttl) as keeper:
        election = Election(etcd, name, value.encode(), keeper.lease_id)
        print(f"CANDIDATE {election.key}", flush=True)
        await election.campaign()
        print(f"LEADER {election.key}", flush=True)
        await asyncio.Event().wait()  # lead until killed


if __name__ == "__main__":
    endpoint, namespace, name, value, ttl = sys.argv[1:]
    asyncio.run(main(endpoint, namespace, name, value, int(ttl)))
