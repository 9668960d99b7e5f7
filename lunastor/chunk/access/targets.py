"""Every target and LUN in etcd, served by this chunk server (the `TargetHost` of
`IscsiServer`). docs/datapath.md, "Serving iSCSI".

The LUN map (`/v1/luns/`), volume records, target records (CHAP) and discovery CHAP are
followed with `PrefixCache`s; each change rebuilds the LUN tables of the `ScsiTarget`s, which
raise REPORTED LUNS DATA HAS CHANGED for the nexuses whose view changed. A volume keeps its
`LogicalUnit` (and so its per-nexus SCSI state) across changes; a size change bumps its
capacity generation (CAPACITY DATA HAS CHANGED).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lunastor.chunk.access.iscsi_server import IscsiServer
from lunastor.chunk.access.qos import apply_limits
from lunastor.chunk.access.qos_share import QosCoordinator
from lunastor.chunk.access.volume import AccessPath, ReplicatedVolume
from lunastor.common.etcd import Etcd
from lunastor.common.etcd.cache import PrefixCache, catch_up_all
from lunastor.common.records import (
    TARGET_IQN_PREFIX,
    ChapRecord,
    Keys,
    LunRecord,
    RecordError,
    TargetRecord,
    VolumeRecord,
    target_iqn,
)
from lunastor.common.sealing import Sealer, SealError
from lunastor.iscsi.chap import ChapCredentials
from lunastor.iscsi.scsi.reservations import InProcessReservations, ReservationStore
from lunastor.iscsi.scsi.target import LogicalUnit, ScsiTarget
from lunastor.iscsi.scsi.types import Nexus
from lunastor.iscsi.session import TargetInfo

log = logging.getLogger(__name__)

# Seconds a login refused (or a LUN not found) on a view that may lag etcd waits for the view
# to catch up before the refusal stands (`EtcdTargetHost.catch_up`).
CATCH_UP_TIMEOUT = 10.0


def volume_identity(volume_id: str) -> tuple[int, str]:
    """The NAA 6 identifier and serial number of a volume: the same on every access point and
    for the volume's whole life (they depend on its id only)."""
    digest = hashlib.sha256(f"lunastor-volume/{volume_id}".encode()).digest()
    naa = (0x6 << 124) | (int.from_bytes(digest[:16], "big") >> 4)
    return naa, volume_id


@dataclass(frozen=True)
class ExportedLun:
    target: int
    lun: int
    volume: ReplicatedVolume
    unit: LogicalUnit
    initiators: frozenset[str]


@dataclass
class _Lun:
    volume: ReplicatedVolume
    unit: LogicalUnit
    initiators: frozenset[str]


class EtcdTargetHost:
    def __init__(
        self,
        etcd: Etcd,
        path: AccessPath,
        extent_size: int,
        *,
        relative_port: Callable[[], int],
        relative_ports: Callable[[], list[int]],
        sealer: Sealer | None,
        reservations: ReservationStore | None = None,
        qos: QosCoordinator | None = None,
    ) -> None:
        """`reservations`: where SCSI reservation state lives (`EtcdReservations` on a chunk
        server, so that every access point enforces it; in-process when not given). `qos`:
        shares limited volumes' limits with the other access points (docs/qos.md)."""
        self.qos = qos
        self.path = path
        self.reservations: ReservationStore = reservations or InProcessReservations()
        self.extent_size = extent_size
        self.sealer = sealer
        self._relative_port = relative_port
        self._relative_ports = relative_ports
        self.luns = PrefixCache(etcd, Keys.LUNS)
        self.volumes = PrefixCache(etcd, Keys.VOLUMES)
        self.target_records = PrefixCache(etcd, Keys.TARGETS)
        self.discovery = PrefixCache(etcd, Keys.DISCOVERY_CHAP)
        self.server: IscsiServer | None = None
        self.targets: dict[int, ScsiTarget] = {}
        self._luns: dict[tuple[int, int], _Lun] = {}
        self._units: dict[str, tuple[ReplicatedVolume, LogicalUnit]] = {}  # by volume id
        self._chap: dict[int, ChapCredentials | None] = {}
        self._discovery_chap: ChapCredentials | None = None
        self._task: asyncio.Task[None] | None = None
        self.changes = 0  # rebuilds done (tests wait on it)
        self._built: tuple[int, ...] = ()  # the caches' revisions the last rebuild read
        self.on_rebuild: list[Callable[[], None]] = []  # called after each rebuild (LIO export)

    async def start(self) -> None:
        for cache in self._caches:
            await cache.start()
        self.rebuild()
        self._task = asyncio.create_task(self._follow(), name="target host")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for cache in self._caches:
            await cache.stop()

    @property
    def _caches(self) -> tuple[PrefixCache, ...]:
        return (self.luns, self.volumes, self.target_records, self.discovery)

    async def _follow(self) -> None:
        while True:
            # Until a cache moved past what the last rebuild read (not what the caches hold
            # when this task gets to run, nor the next notification alone): a change applied
            # between a rebuild (or `start`'s) and these waiters is built, not left until
            # some other change. Missing it served a stale ACL: a starting worker's logins
            # met "Authorization failure" for 60 s after an export.
            built = self._built
            waits = [
                asyncio.ensure_future(self._moved(c, r))
                for c, r in zip(self._caches, built, strict=True)
            ]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if self._revisions() != self._built:
                try:
                    self.rebuild()
                except Exception:  # a bad record must not stop serving the others
                    log.exception("rebuilding the LUN map failed")

    @staticmethod
    async def _moved(cache: PrefixCache, revision: int) -> None:
        async with cache.changed:
            await cache.changed.wait_for(lambda: cache.revision != revision)

    def _revisions(self) -> tuple[int, ...]:
        return tuple(c.revision for c in self._caches)

    async def catch_up(self, timeout: float = CATCH_UP_TIMEOUT) -> None:
        """Serve at least what etcd holds now: wait until every cache applied the newest key
        written under its prefix, then rebuild if that is still to do. The watches deliver a
        change some time after it committed (long on a loaded machine), while meta answers
        an export as soon as it committed: a login refused, or a LUN not found, on the view
        of before is decided again after this (`IscsiServer`'s `catch_up`), so that whoever
        logs in once the export call returned is never refused. Raises TimeoutError after
        `timeout` seconds, an EtcdError when etcd does not answer."""
        await catch_up_all(self._caches, timeout)
        if self._revisions() != self._built:
            self.rebuild()  # now, not when `_follow` gets to run

    # -- rebuilding from the caches ------------------------------------------------------------

    def rebuild(self) -> None:
        self._built = self._revisions()  # what this rebuild reads (synchronously: all of it)
        volumes: dict[str, VolumeRecord] = {}
        for kv in self.volumes.items.values():
            try:
                v = VolumeRecord.from_json(kv.value)
            except RecordError:
                continue
            volumes[v.id] = v
        wanted: dict[tuple[int, int], tuple[VolumeRecord, frozenset[str]]] = {}
        for kv in self.luns.items.values():
            try:
                target, lun = Keys.parse_lun(kv.key)
                rec = LunRecord.from_json(kv.value)
            except (ValueError, RecordError):
                continue
            vol = volumes.get(rec.volume_id)
            if vol is None or vol.size_bytes <= 0:
                continue
            wanted[(target, lun)] = (vol, frozenset(rec.initiators))
        # units per volume, kept across rebuilds
        for vid in [v for v in self._units if v not in {w[0].id for w in wanted.values()}]:
            self._units.pop(vid)[0].io.forget()
            if self.qos is not None:
                self.qos.track(vid, None)
        new_luns: dict[tuple[int, int], _Lun] = {}
        for key, (vol, initiators) in wanted.items():
            unit = self._units.get(vol.id)
            if unit is None:
                device = ReplicatedVolume(vol, self.path, self.extent_size)
                naa, serial = volume_identity(vol.id)
                # COMPARE AND WRITE of one block never spans two extents, so it is always
                # atomic at the extent's primary (docs/datapath.md, "COMPARE AND WRITE")
                lu = LogicalUnit(
                    device, naa_id=naa, serial=serial, pr_key=vol.id, max_compare_write_blocks=1
                )
                unit = (device, lu)
                self._units[vol.id] = unit
            else:
                unit[0].update(vol)
            # per-volume QoS (docs/qos.md)
            track = self.qos.track if self.qos is not None else None
            apply_limits(vol, unit[0], unit[1], unit[0].io, track)
            new_luns[key] = _Lun(unit[0], unit[1], initiators)
        old_luns, self._luns = self._luns, new_luns
        by_target: dict[int, dict[int, LogicalUnit]] = {}
        for (target, lun), entry in new_luns.items():
            by_target.setdefault(target, {})[lun] = entry.unit
        for target in set(by_target) | set(self.targets):
            luns = by_target.get(target, {})
            st = self.targets.get(target)
            if st is None:
                st = ScsiTarget(
                    target_iqn(target),
                    luns,
                    relative_port=self._relative_port(),
                    reservations=self.reservations,
                    visible_luns=self._visible_for(target),
                    relative_ports=self._relative_ports,
                    abort_tasks=self._abort_tasks,
                    spawn=asyncio.ensure_future,
                )
                self.targets[target] = st
                continue
            acl_changed = any(
                old_luns.get((target, n)) is None
                or old_luns[(target, n)].initiators != new_luns[(target, n)].initiators
                for n in luns
            )
            if st.luns != luns:
                st.set_luns(luns)
            elif acl_changed:
                st.visibility_changed()
        self._chap = {}
        for kv in self.target_records.items.values():
            try:
                tr = TargetRecord.from_json(kv.value)
            except RecordError:
                continue
            self._chap[tr.target] = self._credentials(tr.chap)
        dkv = self.discovery.get(Keys.DISCOVERY_CHAP)
        self._discovery_chap = None
        if dkv is not None:
            with contextlib.suppress(RecordError):
                record = ChapRecord.from_json(dkv.value)
                self._discovery_chap = self._credentials(dataclasses.asdict(record))
        self.changes += 1
        for listener in self.on_rebuild:
            listener()

    def exported(self) -> list[ExportedLun]:
        """Every (target, LUN) served now, with its volume, unit and ACL (for the LIO export)."""
        return [
            ExportedLun(target, lun, entry.volume, entry.unit, entry.initiators)
            for (target, lun), entry in sorted(self._luns.items())
        ]

    def _credentials(self, chap: dict[str, object] | None) -> ChapCredentials | None:
        if not chap or not chap.get("user"):
            return None
        if self.sealer is None:
            log.error("CHAP is set in etcd but this chunk server has no secret_key to open it")
            # Refuse rather than admit without CHAP: an impossible secret nobody knows.
            return ChapCredentials(str(chap["user"]), b"\x00" * 16 + b"unopenable")
        try:
            secret = self.sealer.open(str(chap.get("secret", ""))).encode()
            mutual_user = str(chap.get("mutual_user") or "") or None
            mutual = None
            if mutual_user and chap.get("mutual_secret"):
                mutual = self.sealer.open(str(chap["mutual_secret"])).encode()
        except SealError as exc:
            log.error("cannot open a CHAP secret: %s", exc)
            return ChapCredentials(str(chap["user"]), b"\x00" * 16 + b"unopenable")
        return ChapCredentials(str(chap["user"]), secret, mutual_user, mutual)

    def _visible_for(self, target: int) -> Callable[[Nexus], set[int]]:
        def visible(nexus: Nexus) -> set[int]:
            return {
                lun
                for (t, lun), entry in self._luns.items()
                if t == target and nexus.initiator_name in entry.initiators
            }

        return visible

    def _abort_tasks(self, nexus: Nexus, lun: int) -> None:
        if self.server is not None:
            self.server.abort_nexus_tasks(nexus, lun)

    # -- TargetHost ----------------------------------------------------------------------------

    @staticmethod
    def _number(name: str) -> int | None:
        if not name.startswith(TARGET_IQN_PREFIX):
            return None
        rest = name[len(TARGET_IQN_PREFIX) :]
        return int(rest) if rest.isdigit() and rest == str(int(rest)) else None

    def target_exists(self, target: str) -> bool:
        n = self._number(target)
        return n is not None and any(t == n for t, _ in self._luns)

    def volumes_for(self, initiator: str, target: str) -> list[str]:
        """The volumes `initiator` sees behind `target` (a chunk server's worker 0 hands a
        login to the worker that owns them, chunk/workers.py)."""
        n = self._number(target)
        found = {
            e.volume.record.id
            for (t, _), e in self._luns.items()
            if t == n and initiator in e.initiators
        }
        return sorted(found)

    def may_login(self, initiator: str, target: str) -> bool:
        n = self._number(target)
        return n is not None and any(
            t == n and initiator in e.initiators for (t, _), e in self._luns.items()
        )

    def chap(self, target: str | None) -> ChapCredentials | None:
        if target is None:
            return self._discovery_chap
        n = self._number(target)
        return self._chap.get(n) if n is not None else None

    def discoverable(self, initiator: str, portal: str) -> Sequence[TargetInfo]:
        numbers = sorted({t for (t, _), e in self._luns.items() if initiator in e.initiators})
        addresses = (f"{portal},1",) if portal else ()
        return [TargetInfo(target_iqn(n), addresses) for n in numbers]

    def redirect(self, initiator: str, target: str) -> str | None:
        return None

    def scsi_target(self, name: str) -> ScsiTarget | None:
        n = self._number(name)
        return self.targets.get(n) if n is not None else None
