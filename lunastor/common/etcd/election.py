"""Leader election on a lease, the etcd create_revision recipe.

Each candidate puts `<name>/<lease id in hex>` under its lease. The candidate whose key has
the lowest create_revision leads; the others each wait for the key just before theirs to be
deleted (resignation, or lease expiry when a leader dies), so one deletion wakes one waiter.
Leadership ends when the candidate's lease is lost: watch `LeaseKeeper.lost`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aetcd import rpc

from lunastor.common.etcd.errors import EtcdLeaseLost, EtcdRequestError
from lunastor.common.etcd.model import (
    Compare,
    Delete,
    EventType,
    Get,
    KeyValue,
    Put,
    WatchResync,
)

if TYPE_CHECKING:
    from lunastor.common.etcd.client import Etcd


class Election:
    """One candidate in the election `name` (a key prefix, without the trailing slash)."""

    def __init__(self, etcd: Etcd, name: str, value: bytes, lease: int) -> None:
        if not isinstance(lease, int) or isinstance(lease, bool) or lease <= 0:
            raise EtcdRequestError(f"an election needs a lease id, not {lease!r}")
        self.etcd = etcd
        self.name = name.rstrip("/")
        self.prefix = self.name + "/"
        self.value = value
        self.lease = lease
        #: This candidate's key.
        self.key = f"{self.prefix}{lease:x}"
        #: create_revision of `key` once campaigning (0 before).
        self.revision = 0

    async def campaign(self) -> None:
        """Return once this candidate leads. Raises `EtcdLeaseLost` if its key disappears
        (the lease expired or was revoked) while waiting."""
        result = await self.etcd.txn(
            [Compare.create_revision(self.key) == 0],
            [Put(self.key, self.value, self.lease)],
            [Get(self.key)],
        )
        if result.succeeded:
            self.revision = result.revision
        else:  # campaigning again on the same lease: keep our place, refresh the value
            existing = result.responses[0]
            assert isinstance(existing, list) and existing
            self.revision = existing[0].create_revision
            await self.etcd.txn(
                [Compare.create_revision(self.key) == self.revision],
                [Put(self.key, self.value, self.lease)],
            )
        await self._wait_for_predecessors()

    async def _wait_for_predecessors(self) -> None:
        while True:
            predecessor, revision = await self._predecessor()
            if await self.etcd.get(self.key) is None:
                raise EtcdLeaseLost(f"election {self.name!r}: our key {self.key!r} is gone")
            if predecessor is None:
                return
            async for item in self.etcd.watch_prefix(self.prefix, revision + 1):
                if isinstance(item, WatchResync):
                    break
                if item.type is EventType.DELETE and item.kv.key in (predecessor, self.key):
                    break

    async def _predecessor(self) -> tuple[str | None, int]:
        """The candidate key created just before ours, and the revision it was read at."""
        start, end = self.etcd.keys.prefix_range(self.prefix)
        request = rpc.RangeRequest(
            key=start,
            range_end=end,
            limit=1,
            max_create_revision=self.revision - 1,
            sort_target=rpc.RangeRequest.CREATE,
            sort_order=rpc.RangeRequest.DESCEND,
        )
        resp = await self.etcd._call("kv", "Range", request, idempotent=True)
        key = self.etcd.keys.decode(resp.kvs[0].key) if resp.kvs else None
        return key, int(resp.header.revision)

    async def resign(self) -> None:
        """Give up leadership (or candidacy); the next candidate takes over."""
        if self.revision:
            await self.etcd.txn(
                [Compare.create_revision(self.key) == self.revision], [Delete(self.key)]
            )
            self.revision = 0

    async def leader(self) -> KeyValue | None:
        """The current leader's key and value, or None when nobody campaigns."""
        start, end = self.etcd.keys.prefix_range(self.prefix)
        request = rpc.RangeRequest(
            key=start,
            range_end=end,
            limit=1,
            sort_target=rpc.RangeRequest.CREATE,
            sort_order=rpc.RangeRequest.ASCEND,
        )
        resp = await self.etcd._call("kv", "Range", request, idempotent=True)
        return self.etcd.keys.kv(resp.kvs[0]) if resp.kvs else None

    async def observe(self) -> AsyncIterator[KeyValue | None]:
        """The leader now, then each time it changes (None while there is none)."""
        kvs, revision = await self.etcd.get_prefix(self.prefix)
        candidates = {kv.key: kv for kv in kvs}
        current = _first(candidates)
        yield current
        async for item in self.etcd.watch_prefix(self.prefix, revision + 1):
            if isinstance(item, WatchResync):
                candidates = {kv.key: kv for kv in item.kvs}
            elif item.type is EventType.PUT:
                candidates[item.kv.key] = item.kv
            else:
                candidates.pop(item.kv.key, None)
            new = _first(candidates)
            if new != current:
                current = new
                yield current


def _first(candidates: dict[str, KeyValue]) -> KeyValue | None:
    return min(candidates.values(), key=lambda kv: kv.create_revision, default=None)
