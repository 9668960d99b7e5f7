"""The chunk server's data path, assembled: extent store, extent map, data port, access path,
and the iSCSI target serving every LUN in etcd. `main.serve` starts one of these."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from lunastor.chunk.access.iscsi_server import IscsiServer, ServerConfig
from lunastor.chunk.access.nexus_epochs import NexusEpochs
from lunastor.chunk.access.qos_share import QosCoordinator
from lunastor.chunk.access.reservations import EtcdReservations
from lunastor.chunk.access.targets import EtcdTargetHost
from lunastor.chunk.access.volume import AccessPath
from lunastor.chunk.config import ChunkConfig
from lunastor.chunk.maintenance.collector import ReplicaCollector
from lunastor.chunk.maintenance.datadirs import DataDirMonitor
from lunastor.chunk.maintenance.locality_plan import ClaimPolicy
from lunastor.chunk.maintenance.repair import Repairer
from lunastor.chunk.maintenance.restart import Returns, stop_cleanly
from lunastor.chunk.maintenance.scrub import Scrubber
from lunastor.chunk.replication.extentmap import ExtentMap
from lunastor.chunk.replication.fencing import EpochTable
from lunastor.chunk.replication.node import DataNode, Replicas
from lunastor.chunk.seen import SeenPublisher
from lunastor.chunk.store import ExtentStore
from lunastor.chunk.wire.server import DataServer
from lunastor.chunk.workers import Place, owner
from lunastor.common.daemon import StartupError, parse_hostport
from lunastor.common.etcd import Etcd, EtcdError
from lunastor.common.etcd.cache import PrefixCache
from lunastor.common.records import ClusterConfigRecord, Keys, RecordError
from lunastor.common.sealing import Sealer

if TYPE_CHECKING:
    from lunastor.chunk.access.lio.exporter import LioExporter

log = logging.getLogger(__name__)


async def cluster_extent_size(etcd: Etcd, proposal: int) -> int:
    """The cluster's extent size: stored once by the first chunk server, then fixed."""
    await etcd.create(Keys.CLUSTER_CONFIG, ClusterConfigRecord(extent_size=proposal).to_json())
    kv = await etcd.get(Keys.CLUSTER_CONFIG)
    if kv is None:
        return proposal
    try:
        return ClusterConfigRecord.from_json(kv.value).extent_size
    except RecordError as exc:
        raise RuntimeError(f"{Keys.CLUSTER_CONFIG} is unreadable: {exc}") from None


async def claim_relative_port(etcd: Etcd, chunk_id: str) -> int:
    """This chunk server's relative target port: distinct per server and kept for good.

    The lowest free number is claimed with a create-if-absent transaction; a server that
    already holds one (`/v1/target-ports/<n>` = its id) keeps it across restarts."""
    while True:
        kvs, _ = await etcd.get_prefix(Keys.TARGET_PORTS)
        taken = {}
        for kv in kvs:
            with contextlib.suppress(ValueError):
                taken[int(kv.key.removeprefix(Keys.TARGET_PORTS))] = kv.value.decode()
        mine = [n for n, owner in taken.items() if owner == chunk_id]
        if mine:
            return min(mine)
        number = next(n for n in range(1, len(taken) + 2) if n not in taken)
        if number > 0xFFFF:
            raise RuntimeError("no relative target port left")
        if await etcd.create(Keys.target_port(number), chunk_id.encode()):
            return number


class DataPath:
    def __init__(
        self,
        config: ChunkConfig,
        etcd: Etcd,
        chunk_id: str,
        alive: Callable[[], bool],
        lease: Callable[[], tuple[int, float]] | None = None,
        status_changed: Callable[[], None] | None = None,
        place: Place | None = None,
    ) -> None:
        """`lease()`: the chunk lease (id, `time.monotonic()` until which it is surely alive),
        (0, 0.0) while none; with it, SCSI reservations live in etcd and every access point
        enforces them (`EtcdReservations`). `place`: this process's place among the server's
        workers (chunk/workers.py), None for a server of one process."""
        self.config = config
        self.etcd = etcd
        self.chunk_id = chunk_id
        self.alive = alive
        self.place = place
        self.store: ExtentStore | None = None
        self.emap = ExtentMap(etcd, chunk_id)
        secret = config.cluster_secret.encode()
        spec = place.spec if place is not None else None
        siblings = place.siblings if place is not None else None
        self.replicas = Replicas(self.emap, secret, chunk_id, spec, siblings)
        # each worker is an access point of its own where access points are counted
        access_id = chunk_id + (spec.access_id_suffix if spec is not None else "")
        self.node: DataNode | None = None
        self.data_server: DataServer | None = None
        self.host: EtcdTargetHost | None = None
        self.iscsi: IscsiServer | None = None
        self.repairer: Repairer | None = None
        self.scrubber: Scrubber | None = None
        self.monitor: DataDirMonitor | None = None
        self.returns: Returns | None = None  # planned restarts (maintenance/restart.py)
        self.status_changed = status_changed
        self.ports = PrefixCache(etcd, Keys.TARGET_PORTS)
        self.relative_port = 0
        self.epochs = NexusEpochs(etcd, chunk_id) if config.fence_writes else None
        self.reservations: EtcdReservations | None = None
        # limited volumes served by several access points share their limits (docs/qos.md)
        self.qos = QosCoordinator(etcd, access_id, lease) if lease is not None else None
        if lease is not None:
            self.reservations = EtcdReservations(
                etcd, access_id, lease=lease, lease_ttl=config.lease_ttl
            )
        if place is None:
            self.seen = SeenPublisher(etcd, self.emap.volumes, chunk_id)
        elif place.spec.index == 0:  # publishes the lowest of every worker's
            self.seen = SeenPublisher(
                etcd, self.emap.volumes, chunk_id, lowest=place.shared.lowest_seen
            )
        else:
            sink = partial(place.shared.set_seen, place.spec.index)
            self.seen = SeenPublisher(etcd, self.emap.volumes, chunk_id, sink=sink)
        self.collector: ReplicaCollector | None = None
        self.lio: LioExporter | None = None

    def _relative_ports(self) -> list[int]:
        return sorted(int(k.removeprefix(Keys.TARGET_PORTS)) for k in self.ports.items)

    async def start(self) -> None:
        await self.ports.start()
        self.relative_port = await claim_relative_port(self.etcd, self.chunk_id)
        config = self.config
        extent_size = await cluster_extent_size(self.etcd, config.extent_size)
        owns = self.place.spec.owns if self.place is not None else None
        # one journal per process in each data directory (docs/extent-format.md, "Journal")
        journal = str(self.place.spec.index) if self.place is not None else "0"
        self.store = ExtentStore(config.data_dirs, extent_size, owns=owns, journal=journal)
        listing = self.store.list_replicas()
        for problem in listing.problems:
            log.error("replica problem: %s: %s", problem.path, problem.reason)
        await self.emap.start()
        # "starting": the others wait for us (not remove us) until our data path serves
        self.returns = await Returns(
            self.etcd,
            self.emap,
            self.chunk_id,
            grace=config.restart_grace,
            lead=self.place is None or self.place.spec.index == 0,
        ).start()
        if self.epochs is not None:
            # before the data port opens: a restarted primary knows every live login's epoch
            await self.epochs.start()
        await self.seen.publish_once()  # before any IO: meta's fence counts us from now on
        self.seen.start()
        self.collector = ReplicaCollector(self.etcd, self.store, self.chunk_id)
        await self.collector.start()
        self.node = DataNode(
            self.store,
            self.emap,
            self.replicas,
            self.chunk_id,
            alive=self.alive,
            min_replicas=config.min_replicas,
            read_lease=config.lease_ttl / 2,
            epochs=EpochTable(self.epochs.known) if self.epochs is not None else None,
            expected_back=self.returns.expected,
        )
        self.node.start()
        self.data_server = DataServer(self.node, config.cluster_secret.encode(), self.chunk_id)
        await self.data_server.start(*parse_hostport(config.data_listen, "data_listen"))
        path = AccessPath(
            self.emap,
            self.replicas,
            self.chunk_id,
            lease_ttl=config.lease_ttl,
            read_lease=config.lease_ttl / 2,
            io_timeout=config.io_timeout,
            epochs=self.epochs,
            expected_back=self.returns.until,
        )
        self.node.resume = path.recover  # members found differing as we become primary
        sealer = Sealer(config.secret_key) if config.secret_key else None
        if self.reservations is not None:
            # before serving iSCSI: registered, so that no reservation change misses us
            await self.reservations.start()
        self.host = EtcdTargetHost(
            self.etcd,
            path,
            extent_size,
            relative_port=lambda: self.relative_port,
            relative_ports=self._relative_ports,
            sealer=sealer,
            reservations=self.reservations,
            qos=self.qos,
        )
        await self.host.start()
        if self.qos is not None:
            self.qos.start()
        self.iscsi = IscsiServer(
            self.host,
            ServerConfig(
                # several workers: worker 0 accepts and hands connections over (`adopt`)
                listen=[parse_hostport(config.iscsi_listen, "iscsi_listen")]
                if self.place is None
                else [],
                relative_port=self.relative_port,
            ),
            observer=self.epochs,
            catch_up=self.host.catch_up,
        )
        self.host.server = self.iscsi
        await self.iscsi.start()
        self.repairer = await Repairer(
            self.etcd,
            self.emap,
            self.node,
            path,
            replace_after=config.replace_after,
            rebuild_rate=config.rebuild_rate,
            concurrency=config.rebuild_concurrency,
            interval=config.repair_interval,
            locality=ClaimPolicy() if config.locality else None,
            returns=self.returns,
        ).start()
        self.scrubber = Scrubber(
            self.store,
            self.emap,
            self.replicas.call,
            self.chunk_id,
            etcd=self.etcd,
            rate=config.scrub_rate,
            interval=config.scrub_interval,
        )
        self.scrubber.start()
        self.monitor = DataDirMonitor(
            self.store,
            self.node,
            path,
            self.emap,
            self.chunk_id,
            interval=config.data_dir_check_interval,
            changed=self.status_changed,
        )
        if config.lio_export:
            from lunastor.chunk.access.lio.exporter import LioExporter
            from lunastor.chunk.access.lio.rtsconfig import LioUnavailable

            self.lio = LioExporter(
                self.host,
                [parse_hostport(config.lio_listen, "lio_listen")],
                self.relative_port,
                command_timeout=int(config.io_timeout) + 15,
            )
            try:
                await self.lio.start()
            except LioUnavailable as exc:
                raise StartupError(f"lio_export: {exc}") from None
        await self.returns.ready()  # serving: nobody waits for us any more
        # Only now: its start-up search for missing replicas (a wiped disk) asks their
        # primaries to drop us, which they refuse while we are still expected back.
        self.monitor.start()
        log.info(
            "data path up: extent size %d, %d replicas on disk", extent_size, len(listing.replicas)
        )

    def worker_for(self, initiator: str, target: str) -> int | None:
        """The worker that owns every volume `initiator` sees behind `target`: its session
        does all its IO without a hop (chunk/workers.py); None if there is no such one."""
        if self.host is None or self.place is None:
            return None
        count = self.place.spec.count
        owners = {owner(v, count) for v in self.host.volumes_for(initiator, target)}
        return owners.pop() if len(owners) == 1 else None

    def connections(self) -> int:
        """iSCSI connections open here."""
        return len(self.iscsi.connections) if self.iscsi is not None else 0

    def adopt(self, sock: socket.socket) -> None:
        """Serve an iSCSI connection accepted by worker 0 (chunk/workers.py)."""
        if self.iscsi is None:
            sock.close()
            return
        self.iscsi.adopt(sock)

    async def stopping(self) -> None:
        """Say we stop on purpose and are expected back, before any part of us stops (worker
        0, before the other workers stop: docs/faults.md, "Planned restarts")."""
        if self.returns is not None:
            with contextlib.suppress(EtcdError):
                await self.returns.mark("stopping")

    async def stop(self) -> None:
        """A clean stop (SIGTERM): a planned restart, not a failure (docs/faults.md)."""
        if self.repairer is not None:
            await self.repairer.stop()
        if self.returns is not None and self.node is not None:
            # expected back: our extents handed over where a live member can take them,
            # then our live record goes (the lease itself is revoked by main, last)
            await stop_cleanly(self.returns, self.node, self.emap)
        if self.scrubber is not None:
            await self.scrubber.stop()
        if self.monitor is not None:
            await self.monitor.stop()
        if self.lio is not None:
            await self.lio.stop()
        if self.iscsi is not None:
            await self.iscsi.close()
        if self.host is not None:
            await self.host.stop()
        if self.qos is not None:
            await self.qos.stop()
        if self.data_server is not None:
            await self.data_server.close()
        if self.node is not None:
            await self.node.stop()
        if self.reservations is not None:
            await self.reservations.stop()
        if self.collector is not None:
            await self.collector.stop()
        await self.seen.stop()
        if self.returns is not None:
            await self.returns.stop()
        await self.replicas.close()
        if self.epochs is not None:
            await self.epochs.stop()
        await self.emap.stop()
        await self.ports.stop()
        if self.store is not None:
            await self.store.close()
