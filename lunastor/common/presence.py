"""A daemon's presence in etcd: a record bound to a lease that a keeper thread keeps alive.

While the process lives, its `LeaseKeeper` refreshes the lease off the IO loop (so a busy data
path cannot starve the heartbeat) and the record exists. When the process dies, the lease
expires after its TTL and etcd deletes the record: that absence is how the cluster sees the
daemon down. If the lease is lost while the process lives (etcd unreachable for longer than the
TTL), `Presence` reports it, then grants a new lease and writes the record again once etcd is
back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import lunastor
from lunastor.common.etcd import Etcd, EtcdConfig, EtcdError, LeaseKeeper
from lunastor.common.logs import get_logger
from lunastor.common.metrics import ETCD_LEASE_HELD


class Presence:
    """Keeps `key` = `render(lease_id)` in etcd under a live lease."""

    def __init__(
        self,
        etcd: Etcd,
        config: EtcdConfig,
        key: str,
        ttl: float,
        render: Callable[[int], bytes],
        on_lease: Callable[[int], None] | None = None,
    ) -> None:
        """`on_lease(id)` is called with every lease granted (the chunk server's crash guard
        learns from it which lease to revoke when the process dies)."""
        self.etcd = etcd
        self.config = config
        self.key = key
        self.ttl = max(1, round(ttl))
        self.render = render
        self.on_lease = on_lease
        self.keeper: LeaseKeeper | None = None
        self.held = asyncio.Event()  # set while the lease is alive and the record written
        self.changed = asyncio.Event()  # set whenever a new lease was granted
        self._log = get_logger(component="presence", key=key)
        self._task: asyncio.Task[None] | None = None

    @property
    def lease_id(self) -> int:
        return self.keeper.lease_id if self.keeper is not None else 0

    async def start(self, timeout: float = 30.0) -> None:
        """Grant a lease and write the record; raises EtcdError if etcd stays unreachable."""
        await asyncio.wait_for(self._establish(), timeout)
        self._task = asyncio.create_task(self._watch_keeper(), name=f"presence {self.key}")

    async def _establish(self) -> None:
        while True:
            try:
                keeper = await LeaseKeeper(self.config, self.ttl).start()
            except EtcdError as exc:
                self._log.warning("lease grant failed", error=str(exc))
                await asyncio.sleep(min(1.0, self.ttl / 3))
                continue
            try:
                await self.etcd.put(self.key, self.render(keeper.lease_id), lease=keeper.lease_id)
            except EtcdError as exc:
                self._log.warning("record write failed", error=str(exc))
                await keeper.stop(revoke=False)
                await asyncio.sleep(min(1.0, self.ttl / 3))
                continue
            self.keeper = keeper
            if self.on_lease is not None:
                self.on_lease(keeper.lease_id)
            self.held.set()
            self.changed.set()
            ETCD_LEASE_HELD.set(1)
            self._log.info("lease granted", lease=f"{keeper.lease_id:x}", ttl=self.ttl)
            return

    async def _watch_keeper(self) -> None:
        while True:
            keeper = self.keeper
            assert keeper is not None
            # Poll instead of blocking a thread on the Event: a blocked worker thread would
            # hold up the loop's shutdown.
            while not keeper.lost.is_set():
                await asyncio.sleep(0.2)
            self.held.clear()
            ETCD_LEASE_HELD.set(0)
            self._log.error("lease lost", lease=f"{keeper.lease_id:x}")
            await keeper.stop(revoke=False)
            await self._establish()

    async def update(self) -> None:
        """Rewrite the record (e.g. new capacity); a failure is logged, not raised."""
        if not self.held.is_set():
            return
        try:
            await self.etcd.put(self.key, self.render(self.lease_id), lease=self.lease_id)
        except EtcdError as exc:
            self._log.warning("record update failed", error=str(exc))

    async def stop(self) -> None:
        """Revoke the lease so the record disappears at once (a clean shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.keeper is not None:
            await self.keeper.stop(revoke=True)
        self.held.clear()
        ETCD_LEASE_HELD.set(0)


def lease_health(presence: Presence | None, daemon_id: str, **extra: object) -> dict[str, object]:
    """The `/healthz` body of a daemon whose health is its etcd lease: ok while it is held."""
    held = presence is not None and presence.held.is_set()
    return {
        "status": "ok" if held else "degraded",
        "id": daemon_id,
        "lease": held,
        "version": lunastor.__version__,
        **extra,
    }
