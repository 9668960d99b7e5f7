"""Nexus epochs in etcd: the access point's logins and every chunk server's view of them
(docs/datapath.md, "Fencing stale writes").

A login of an I_T nexus at an access point puts `/v1/nexus-epochs/<target>/<initiator port>`
(value: the access point's chunk id); the put's revision is the nexus's new epoch, so epochs
only grow, whichever access point wrote them, and one put is the whole transaction. Writes
of the session wait for that put once (a resolved future afterwards: no etcd round trip per
write) and carry `(initiator port, target, epoch)` to the primary. When the session ends, the
key is deleted only if it is still this login's (compare `mod_revision`), so keys stay
bounded by the sessions alive (a crashed access point leaves its keys until the nexus logs in
again).

Every chunk server follows the prefix (`known`), so a primary that restarted still refuses
logins older than the newest one of a live session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from lunastor.chunk.wire.messages import Nexus as WireNexus
from lunastor.common.etcd import Compare, Delete, Etcd, EtcdError
from lunastor.common.etcd.cache import PrefixCache
from lunastor.common.records import Keys
from lunastor.iscsi.blockdev import NotReady
from lunastor.iscsi.scsi.types import Nexus

log = logging.getLogger(__name__)

RETRY = 0.2  # seconds between attempts to store a login while etcd is unreachable


class NexusEpochs:
    def __init__(self, etcd: Etcd, node_id: str) -> None:
        self.etcd = etcd
        self.node_id = node_id
        self.cache = PrefixCache(etcd, Keys.NEXUS_EPOCHS)
        self._logins: dict[tuple[str, str], asyncio.Task[int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> NexusEpochs:
        await self.cache.start()
        return self

    async def stop(self) -> None:
        for task in [*self._logins.values(), *self._tasks]:
            task.cancel()
        for task in [*self._logins.values(), *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, EtcdError):
                await task
        self._logins.clear()
        await self.cache.stop()

    # -- every chunk server: what etcd says -----------------------------------------------

    def known(self, initiator_port: str, target: str) -> int | None:
        """The newest epoch etcd holds for the nexus (as far as our cache has followed)."""
        kv = self.cache.get(Keys.nexus_epoch(initiator_port, target))
        return kv.mod_revision if kv is not None else None

    # -- the access point: logins ---------------------------------------------------------

    def nexus_started(self, nexus: Nexus) -> Callable[[], None]:
        """A session of `nexus` logged in here: store a new epoch. Returns what to call when
        the session ends."""
        key = (nexus.initiator_port, nexus.target_name)
        login = asyncio.get_running_loop().create_task(self._store(key), name="nexus login")
        self._logins[key] = login

        def ended() -> None:
            if self._logins.get(key) is login:
                del self._logins[key]
            if not login.done():
                login.cancel()
                return
            if login.cancelled() or login.exception() is not None:
                return
            task = asyncio.get_running_loop().create_task(self._forget(key, login.result()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return ended

    async def _store(self, key: tuple[str, str]) -> int:
        while True:
            try:
                return await self.etcd.put(Keys.nexus_epoch(*key), self.node_id.encode())
            except EtcdError as exc:
                log.warning("storing the login of %s -> %s: %s", key[0], key[1], exc)
                await asyncio.sleep(RETRY)

    async def _forget(self, key: tuple[str, str], epoch: int) -> None:
        name = Keys.nexus_epoch(*key)
        try:
            # only our own login: a newer one (here or elsewhere) must stay
            await self.etcd.txn([Compare.mod_revision(name) == epoch], [Delete(name)])
        except EtcdError as exc:
            log.warning("forgetting the login of %s -> %s: %s", key[0], key[1], exc)

    def epoch_now(self, nexus: Nexus) -> WireNexus | None:
        """`epoch` when it needs no waiting (the write fast path); raises NotReady when
        its login is not stored (yet): `epoch` then waits for it, or says why."""
        key = (nexus.initiator_port, nexus.target_name)
        login = self._logins.get(key)
        if login is None:
            return None
        if not login.done() or login.cancelled() or login.exception() is not None:
            raise NotReady(f"the login of {key[0]} is not stored")
        return WireNexus(key[0], key[1], login.result())

    async def epoch(self, nexus: Nexus, timeout: float) -> WireNexus | None:
        """The wire nexus for a write of `nexus` through this access point; None when the
        nexus has no session here (a caller outside iSCSI: the write is not fenced)."""
        key = (nexus.initiator_port, nexus.target_name)
        login = self._logins.get(key)
        if login is None:
            return None
        if not login.done():
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(login)
            except TimeoutError:
                raise NotReady(f"the login of {key[0]} is not stored in etcd yet") from None
        if login.cancelled():
            raise NotReady(f"the session of {key[0]} ended")
        return WireNexus(key[0], key[1], login.result())


__all__ = ["NexusEpochs"]
