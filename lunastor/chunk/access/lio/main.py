"""`lunastor-chunk lio-export`: an access point that exports every LUN through the kernel's LIO.

It holds no extents and does not register as a chunk server (placement never picks it): it
follows etcd's LUN map like a chunk server's iSCSI target, reaches the chunk servers' data ports
with the cluster secret, and serves each volume through a TCMU backstore of LIO (docs/lio.md).
Its settings are a chunk server's (`ChunkConfig`): etcd, cluster_secret, secret_key, io_timeout,
lio_listen (LIO's portal), data_dirs (only to keep its identity across restarts).

    python -m lunastor.chunk.access.lio.main --config lio.toml [--userspace-portal HOST:PORT]

`--userspace-portal` also serves the same LUNs through lunastor's userspace iSCSI target on
HOST:PORT, from the same process and data path (to compare the two front ends).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from lunastor.chunk.access.iscsi_server import IscsiServer, ServerConfig
from lunastor.chunk.access.lio.exporter import LioExporter
from lunastor.chunk.access.lio.rtsconfig import LioUnavailable
from lunastor.chunk.access.targets import EtcdTargetHost
from lunastor.chunk.access.volume import AccessPath
from lunastor.chunk.config import ChunkConfig
from lunastor.chunk.registration import load_or_create_id
from lunastor.chunk.replication.extentmap import ExtentMap
from lunastor.chunk.replication.node import Replicas
from lunastor.chunk.service import claim_relative_port, cluster_extent_size
from lunastor.common.daemon import (
    StartupError,
    config_argparser,
    load_daemon_config,
    parse_hostport,
    run_daemon,
)
from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.etcd.errors import EtcdUnavailable
from lunastor.common.logs import setup_logging
from lunastor.common.sealing import Sealer
from lunastor.common.settings import etcd_client_config

PROG = "lunastor-chunk lio-export"
CONNECT_ATTEMPTS = 6


async def serve(
    config: ChunkConfig, stop: asyncio.Event, userspace_portal: str | None = None
) -> int:
    if not config.cluster_secret:
        raise StartupError("cluster_secret is required: the data ports refuse strangers")
    node_id = f"lio-{load_or_create_id(config.data_dirs)}"
    log = setup_logging(config.log, "lio-export", node=node_id)
    portal = parse_hostport(config.lio_listen, "lio_listen")
    etcd_config = etcd_client_config(config.etcd)
    etcd = await _connect(etcd_config, stop, log)
    if etcd is None:
        return 0  # stopped before etcd answered
    async with etcd:
        extent_size = await cluster_extent_size(etcd, config.extent_size)
        emap = ExtentMap(etcd)
        await emap.start()
        replicas = Replicas(emap, config.cluster_secret.encode(), node_id)
        path = AccessPath(
            emap, replicas, node_id, lease_ttl=config.lease_ttl, io_timeout=config.io_timeout
        )
        relative_port = await claim_relative_port(etcd, node_id)
        host = EtcdTargetHost(
            etcd,
            path,
            extent_size,
            relative_port=lambda: relative_port,
            relative_ports=lambda: [relative_port],
            sealer=Sealer(config.secret_key) if config.secret_key else None,
        )
        await host.start()
        # LIO must not fail a command lunastor is still retrying (io_timeout, then NOT READY)
        iscsi: IscsiServer | None = None
        if userspace_portal:
            listen = parse_hostport(userspace_portal, "--userspace-portal")
            server_config = ServerConfig(listen=[listen], relative_port=relative_port)
            iscsi = IscsiServer(host, server_config, catch_up=host.catch_up)
            host.server = iscsi
            await iscsi.start()
        exporter = LioExporter(
            host, [portal], relative_port, command_timeout=int(config.io_timeout) + 15
        )
        try:
            try:
                await exporter.start()
            except LioUnavailable as exc:
                raise StartupError(str(exc)) from None
            log.info("LIO export serving", portal=config.lio_listen, port=relative_port)
            await stop.wait()
            log.info("LIO export stopping")
        finally:
            await exporter.stop()
            if iscsi is not None:
                await iscsi.close()
            await host.stop()
            await replicas.close()
            await emap.stop()
    return 0


async def _connect(
    etcd_config: EtcdConfig, stop: asyncio.Event, log: Any, attempts: int = CONNECT_ATTEMPTS
) -> Etcd | None:
    """Connect to etcd, retrying a few times: an export host may come up before etcd answers
    (and a loaded guest may not finish gRPC's handshake in one attempt)."""
    for attempt in range(1, attempts + 1):
        try:
            return await Etcd.connect(etcd_config)
        except EtcdUnavailable as exc:
            if attempt == attempts:
                raise StartupError(f"etcd unavailable after {attempts} attempts: {exc}") from None
            log.warning("etcd not reachable yet", attempt=attempt, error=str(exc))
        try:
            await asyncio.wait_for(stop.wait(), min(2.0 * attempt, 10.0))
            return None
        except TimeoutError:
            pass
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_argparser(PROG, "Export lunastor's LUNs through the kernel's LIO target.")
    parser.add_argument(
        "--userspace-portal",
        metavar="HOST:PORT",
        help="also serve the LUNs through lunastor's userspace iSCSI target here",
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return run_daemon(
        PROG,
        lambda stop: serve(load_daemon_config(ChunkConfig, args), stop, args.userspace_portal),
    )


if __name__ == "__main__":
    sys.exit(main())
