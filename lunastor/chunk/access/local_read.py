"""The access point's local read fast path (docs/datapath.md, "Local reads").

When this chunk server holds a current replica of the extent, a read is served from it
directly: no request object, no in-process call through the data node, no task. The
decision repeats every check the general path makes (ARCHITECTURE.md invariant 3: a replica
that missed writes never serves reads), in this order, and any "no" hands the read to the
general path, which then does exactly what it always did (retries, other members, repair):

1. the map's entry (cached per extent until the extent map's revision moves) names this
   server a member, and the extent is not converging after a failover;
2. the data node may serve the read now (`DataNode.may_serve_read`: the primary while its
   own lease is provably alive, a secondary while it holds the primary's read lease);
3. a sole copy is set up as its primary already (the general path's first read does that);
4. the open replica (cached with its file descriptors) is at the map's generation and
   current;
5. every block passes its checksum (a mismatch goes to the general path, which repairs).

The bytes are read with one `preadv` into a pooled buffer and handed on as a memoryview.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from prometheus_client import Counter

from lunastor.chunk.replication.extentmap import Entry, ExtentMap
from lunastor.chunk.replication.node import Replicas
from lunastor.chunk.store import BLOCK_SIZE, ExtentStoreError, Replica, ReplicaState
from lunastor.iscsi.buffers import BufferPool

LOCAL_READS = Counter(
    "lunastor_local_reads_total",
    "Reads an access point served from its own replica on the local fast path",
)

_POOLED_MAX = 8 << 20  # larger reads get a buffer of their own
_PER_CLASS = 64


@dataclass(slots=True)
class _Cached:
    revision: int  # the extent map's version this entry was looked up at
    entry: Entry | None
    replica: Replica | None  # opened once, with its file descriptors


class LocalReads:
    """Serves reads of extents this chunk server holds a current replica of."""

    def __init__(self, emap: ExtentMap, replicas: Replicas, node_id: str) -> None:
        self.emap = emap
        self.replicas = replicas
        self.node_id = node_id
        self.pool = BufferPool(max_pooled=_POOLED_MAX, per_class=_PER_CLASS)
        self._cache: dict[tuple[str, int], _Cached] = {}

    def forget(self, volume: str, index: int) -> None:
        self._cache.pop((volume, index), None)

    def _check(self, volume: str, index: int) -> tuple[Replica | None, bool]:
        """(our replica if it may serve reads now (checks 1-4 above), whether it has yet to
        be opened). Synchronous."""
        node = self.replicas.local
        if node is None or not node.store.owns(volume, index):
            return None, False  # (not ours: a sibling worker's, chunk/workers.py)
        key = (volume, index)
        revision = self.emap.version
        cached = self._cache.get(key)
        if cached is None or cached.revision != revision:
            replica = cached.replica if cached is not None else None
            cached = _Cached(revision, self.emap.entry(volume, index), replica)
            if len(self._cache) >= 65536:
                self._cache.clear()
            self._cache[key] = cached
        entry = cached.entry
        if entry is None:
            return None, False
        rec = entry.record
        if rec.converging or self.node_id not in rec.replicas:
            return None, False
        if not node.may_serve_read(volume, index):
            return None, False
        if len(rec.replicas) == 1 and not node.leading(volume, index):
            return None, False  # a sole copy's first read sets it up as primary (general path)
        replica = cached.replica
        if replica is None or replica.closed:
            return None, True
        if replica.generation != rec.gen or replica.state is not ReplicaState.CURRENT:
            return None, False
        return replica, False

    async def replica(self, volume: str, index: int) -> Replica | None:
        """Our replica of the extent if it may serve reads now (checks 1-4 above), else None.

        Awaits only to open a replica the first time (the store's open), never for IO; that
        first time answers None (the checks ran before the open's await)."""
        replica, needs_open = self._check(volume, index)
        if needs_open and self.replicas.local is not None:
            cached = self._cache[(volume, index)]
            with contextlib.suppress(ExtentStoreError):
                cached.replica = await self.replicas.local.store.open(volume, index)
        return replica

    def read_now(self, volume: str, index: int, offset: int, length: int) -> memoryview | None:
        """`read` without awaiting (the iSCSI inline path): None also when the replica has
        yet to be opened (the general path's first read does it)."""
        replica, _ = self._check(volume, index)
        return None if replica is None else self._read(replica, offset, length)

    def _read(self, replica: Replica, offset: int, length: int) -> memoryview | None:
        try:
            first, end = offset // BLOCK_SIZE, -(-(offset + length) // BLOCK_SIZE)
            data = replica.read_into(offset, length, self.pool.take((end - first) * BLOCK_SIZE))
        except ExtentStoreError:
            return None  # checksum mismatch, failed directory...: the general path handles it
        LOCAL_READS.inc()
        return data

    async def read(self, volume: str, index: int, offset: int, length: int) -> memoryview | None:
        """The bytes from our own replica, verified; None when the general path must decide."""
        replica = await self.replica(volume, index)
        return None if replica is None else self._read(replica, offset, length)
