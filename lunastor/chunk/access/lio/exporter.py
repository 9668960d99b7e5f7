"""The LIO export: keeps LIO configured from etcd's LUN map and serves each TCMU backstore.

`LioExporter` follows an `EtcdTargetHost` (the LUN map, volume records, ACLs and CHAP from etcd,
and one `LogicalUnit` per volume over a `ReplicatedVolume`). After each change it computes a
`LioPlan`, stops the handlers of backstores that go away, applies the plan through rtslib-fb
and starts a `TcmuDevice` for each new backstore. Data never leaves lunastor's data path: LIO
carries the iSCSI sessions, lunastor's SCSI layer and replication carry the commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from lunastor.chunk.access.lio.plan import LioPlan, LunExport, plan
from lunastor.chunk.access.lio.rtsconfig import RtsConfig
from lunastor.chunk.access.lio.tcmu import TcmuDevice
from lunastor.chunk.access.targets import EtcdTargetHost
from lunastor.common.records import target_iqn

log = logging.getLogger(__name__)


class LioExporter:
    def __init__(
        self,
        host: EtcdTargetHost,
        portals: Sequence[tuple[str, int]],
        relative_port: int,
        *,
        rts: RtsConfig | None = None,
        clear_on_stop: bool = True,
        command_timeout: int = 0,
    ) -> None:
        self.host = host
        self.portals = tuple(portals)
        self.relative_port = relative_port
        self.rts = rts
        self.clear_on_stop = clear_on_stop
        self.command_timeout = command_timeout
        self.devices: dict[str, TcmuDevice] = {}
        self.syncs = 0  # plans applied (tests and logs)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def current_plan(self) -> LioPlan:
        exports = [
            LunExport(
                target_iqn(e.target),
                e.lun,
                e.volume.record.id,
                e.volume.record.size_bytes,
                e.volume.record.block_size,
                e.initiators,
            )
            for e in self.host.exported()
        ]
        return plan(exports, self.host.chap, self.portals, self.host.chap(None))

    async def start(self) -> None:
        """Configure LIO for what etcd exports now, then follow changes.

        Raises `LioUnavailable` when this machine has no LIO (or no rtslib-fb)."""
        if self.rts is None:
            self.rts = await asyncio.to_thread(
                lambda: RtsConfig(command_timeout=self.command_timeout)
            )
        await self.sync()
        self.host.on_rebuild.append(self._changed.set)
        self._task = asyncio.create_task(self._follow(), name="lio export")

    async def _follow(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self.sync()
            except Exception:  # keep serving what is configured; the next change retries
                log.exception("LIO: applying the LUN map failed")

    async def sync(self) -> None:
        rts = self.rts
        assert rts is not None
        wanted = self.current_plan()
        for problem in wanted.problems:
            log.error("LIO: not exported: %s", problem)
        for name in [n for n in self.devices if n not in wanted.backstores]:
            await self.devices.pop(name).stop()
        await asyncio.to_thread(rts.apply, wanted)
        units = {e.volume.record.id: e.unit for e in self.host.exported()}
        for name, store in wanted.backstores.items():
            unit = units.get(store.volume_id)
            if name in self.devices or unit is None:
                continue  # None: unexported while LIO was being configured; the next sync
            device = TcmuDevice(name, store.config, unit, self.relative_port)
            await device.start()
            self.devices[name] = device
        self.syncs += 1
        log.info(
            "LIO: %d targets, %d backstores served", len(wanted.targets), len(wanted.backstores)
        )

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.host.on_rebuild.remove(self._changed.set)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.clear_on_stop and self.rts is not None:
            # the targets go first: LIO stops sending commands, then the handlers can go
            await asyncio.to_thread(self.rts.clear_targets)
        for device in self.devices.values():
            await device.stop()
        self.devices.clear()
        if self.clear_on_stop and self.rts is not None:
            await asyncio.to_thread(self.rts.clear)
