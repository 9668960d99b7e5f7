"""Publishing how far this chunk server's data path follows `/v1/volumes/` (docs/snapshots.md).

Meta answers a snapshot only once every live chunk server's `Keys.live_seen` names a volumes
revision at least the snapshot's (`lunastor/meta/fence.py`): from then on every primary
copies frozen extents aside before writing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from lunastor.common.etcd import Etcd, EtcdError
from lunastor.common.etcd.cache import PrefixCache
from lunastor.common.records import Keys

log = logging.getLogger(__name__)


class SeenPublisher:
    def __init__(self, etcd: Etcd, volumes: PrefixCache, chunk_id: str) -> None:
        self.etcd = etcd
        self.volumes = volumes
        self.key = Keys.live_seen(chunk_id)
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
        if revision > self.published:
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
            with contextlib.suppress(TimeoutError):
                await self.volumes.wait_for(lambda c: c.revision > self.published, timeout=5.0)
