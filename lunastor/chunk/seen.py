"""Publishing how far this chunk server's data path follows `/v1/volumes/` (docs/snapshots.md).

Meta answers a snapshot only once every live chunk server's `Keys.live_seen` names a volumes
revision at least the snapshot's (`lunastor/meta/fence.py`): from then on every primary
copies frozen extents aside before writing them.

A server of several workers (chunk/workers.py) publishes one revision for all of them: each
worker > 0 writes its own to memory shared with worker 0 (`sink`), and worker 0 publishes the
lowest of its own and theirs (`lowest`), looking again every `POLL` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from lunastor.common.etcd import Etcd, EtcdError
from lunastor.common.etcd.cache import PrefixCache
from lunastor.common.records import Keys

log = logging.getLogger(__name__)

POLL = 0.05  # seconds between looks at the other workers' revisions (worker 0)


class SeenPublisher:
    def __init__(
        self,
        etcd: Etcd,
        volumes: PrefixCache,
        chunk_id: str,
        *,
        sink: Callable[[int], None] | None = None,
        lowest: Callable[[int], int] | None = None,
    ) -> None:
        """`sink(revision)`: publish there instead of etcd (a worker > 0); `lowest(own)`: the
        revision to publish given ours (worker 0: the lowest of every worker's)."""
        self.etcd = etcd
        self.volumes = volumes
        self.key = Keys.live_seen(chunk_id)
        self.sink = sink
        self.lowest = lowest
        self.published = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="seen publisher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def publish_once(self) -> None:
        revision = self.volumes.revision
        if self.lowest is not None:
            revision = self.lowest(revision)
        if revision > self.published:
            if self.sink is not None:
                self.sink(revision)
            else:
                await self.etcd.put(self.key, str(revision).encode())
            self.published = revision

    async def _run(self) -> None:
        while True:
            try:
                await self.publish_once()
            except EtcdError as exc:
                log.warning("publishing the volumes revision failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if self.lowest is not None:  # the others' revisions change without an event here
                await asyncio.sleep(POLL)
                continue
            with contextlib.suppress(TimeoutError):
                await self.volumes.wait_for(lambda c: c.revision > self.published, timeout=5.0)
