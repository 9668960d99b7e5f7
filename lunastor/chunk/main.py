"""`lunastor-chunk`: the chunk server daemon (and `lunastor-chunk standalone`, a lone target)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web

import lunastor
from lunastor.chunk.config import ChunkConfig
from lunastor.chunk.registration import (
    build_info,
    build_status,
    info_key,
    load_or_create_id,
    status_key,
)
from lunastor.chunk.service import DataPath
from lunastor.common.daemon import (
    config_argparser,
    load_daemon_config,
    run_daemon,
    start_http,
)
from lunastor.common.etcd import Etcd
from lunastor.common.events import EVENTS
from lunastor.common.logs import setup_logging
from lunastor.common.metrics import add_admin_routes, describe_daemon
from lunastor.common.presence import Presence, lease_health
from lunastor.common.records import ChunkServerInfo, RecordError
from lunastor.common.settings import etcd_client_config

PROG = "lunastor-chunk"


async def serve(config: ChunkConfig, stop: asyncio.Event) -> int:
    chunk_id = load_or_create_id(config.data_dirs)
    log = setup_logging(config.log, "chunk", chunk=chunk_id)
    describe_daemon("chunk")
    portal, data_address = config.portal, config.data_address
    etcd_config = etcd_client_config(config.etcd)
    started_at = time.time()
    presence: Presence | None = None
    datapath: DataPath | None = None

    async def health() -> dict[str, Any]:
        return lease_health(presence, chunk_id)

    app = web.Application()
    add_admin_routes(app, health)
    admin = await start_http(app, config.admin_listen, "admin_listen")
    async with await Etcd.connect(etcd_config) as etcd:
        info = build_info(chunk_id, portal=portal, data_address=data_address, zone=config.zone)
        await _register(etcd, info)
        EVENTS.bind(etcd, chunk_id)

        def render(lease: int) -> bytes:
            return build_status(
                chunk_id,
                portal=portal,
                data_address=data_address,
                admin_address=config.admin_listen,
                zone=config.zone,
                version=lunastor.__version__,
                started_at=started_at,
                lease=lease,
                data_dirs=config.data_dirs,
                failed_dirs=failed_dirs(),
                replace_after=config.replace_after,
            ).to_json()

        def failed_dirs() -> dict[str, str]:
            store = datapath.store if datapath is not None else None
            return {d: str(exc) for d, exc in store.failed.items()} if store is not None else {}

        presence = Presence(etcd, etcd_config, status_key(chunk_id), config.lease_ttl, render)
        await presence.start()

        def alive() -> bool:
            # Acknowledge IO only while our lease is provably alive (docs/datapath.md).
            keeper = presence.keeper if presence is not None else None
            return keeper is not None and presence.held.is_set() and keeper.alive()

        def status_changed() -> None:
            # a data directory failed: the live record says so at once, not at the next tick
            if presence is not None:
                task = asyncio.get_running_loop().create_task(presence.update())
                background.add(task)
                task.add_done_callback(background.discard)

        background: set[asyncio.Task[None]] = set()
        if config.cluster_secret:

            def lease() -> tuple[int, float]:
                # the lease the reservation store registers under, and until when it surely
                # lives (docs/scsi.md, "Fencing")
                keeper = presence.keeper if presence is not None else None
                if keeper is None or presence is None or not presence.held.is_set():
                    return 0, 0.0
                if keeper.lost.is_set():
                    return 0, 0.0
                return keeper.lease_id, keeper.deadline()

            datapath = DataPath(config, etcd, chunk_id, alive, lease, status_changed)
            await datapath.start()
        else:
            log.error("no cluster_secret configured: serving neither the data port nor iSCSI")
        log.info("chunk server up", portal=portal, data=data_address, zone=config.zone)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), config.status_interval)
            except TimeoutError:
                await presence.update()
        log.info("chunk server stopping")
        if datapath is not None:
            await datapath.stop()
        await EVENTS.unbind()
        await presence.stop()
    await admin.cleanup()
    return 0


async def _register(etcd: Etcd, info: ChunkServerInfo) -> None:
    """Write the persistent registration unless it already says the same."""
    current = await etcd.get(info_key(info.id))
    if current is not None:
        try:
            old = ChunkServerInfo.from_json(current.value)
        except RecordError:
            old = None
        if old is not None and (old.portal, old.data_address, old.zone) == (
            info.portal,
            info.data_address,
            info.zone,
        ):
            return
        if old is not None:
            info.registered_at = old.registered_at
    await etcd.put(info_key(info.id), info.to_json())


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["standalone"]:
        from lunastor.chunk.standalone import main as standalone_main

        return standalone_main(args_list[1:])
    if args_list[:1] == ["lio-export"]:
        from lunastor.chunk.access.lio.main import main as lio_main

        return lio_main(args_list[1:])
    parser = config_argparser(
        PROG,
        "lunastor chunk server: extent store and iSCSI access point. "
        "`lunastor-chunk standalone --help` runs a lone iSCSI target.",
    )
    args = parser.parse_args(args_list)
    return run_daemon(PROG, lambda stop: serve(load_daemon_config(ChunkConfig, args), stop))


if __name__ == "__main__":
    sys.exit(main())
