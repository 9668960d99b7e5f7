"""`lunastor-chunk`: the chunk server daemon (and `lunastor-chunk standalone`, a lone target)."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

import lunastor
from lunastor.chunk.config import ChunkConfig
from lunastor.chunk.guard import CrashGuard
from lunastor.chunk.maintenance import restart
from lunastor.chunk.registration import (
    build_info,
    build_status,
    info_key,
    load_or_create_id,
    status_key,
)
from lunastor.chunk.service import DataPath
from lunastor.chunk.workers import (
    Place,
    WorkerGroup,
    WorkerSpec,
    connect_patiently,
    data_addresses,
    serve_worker,
    worker_env,
)
from lunastor.common.daemon import (
    config_argparser,
    load_daemon_config,
    parse_hostport,
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


async def serve(config: ChunkConfig, stop: asyncio.Event, argv: Sequence[str] = ()) -> int:
    """Run the chunk server (worker 0 of `config.workers`; `argv` starts the others)."""
    env = worker_env()
    if env is not None:  # a worker > 0 (chunk/workers.py)
        return await serve_worker(config, env, stop)
    chunk_id = load_or_create_id(config.data_dirs)
    log = setup_logging(config.log, "chunk", chunk=chunk_id)
    describe_daemon("chunk")
    portal, data_address = config.portal, config.data_address
    etcd_config = etcd_client_config(config.etcd)
    started_at = time.time()
    presence: Presence | None = None
    datapath: DataPath | None = None
    group: WorkerGroup | None = None

    async def health() -> dict[str, Any]:
        return lease_health(presence, chunk_id)

    app = web.Application()
    add_admin_routes(app, health)
    admin = await start_http(app, config.admin_listen, "admin_listen")
    client = await connect_patiently(etcd_config, stop)
    if client is None:  # stopped before etcd ever answered
        await admin.close()
        return 0
    async with client as etcd:
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
                data_workers=data_addresses(config) if group is not None else [],
            ).to_json()

        def failed_dirs() -> dict[str, str]:
            store = datapath.store if datapath is not None else None
            return {d: str(exc) for d, exc in store.failed.items()} if store is not None else {}

        def lease() -> tuple[int, float]:
            # the lease the reservation store registers under, and until when it surely
            # lives (docs/scsi.md, "Fencing")
            keeper = presence.keeper if presence is not None else None
            if keeper is None or presence is None or not presence.held.is_set():
                return 0, 0.0
            if keeper.lost.is_set():
                return 0, 0.0
            return keeper.lease_id, keeper.deadline()

        # revokes our lease the moment this process is gone, however it goes (guard.py)
        guard = await CrashGuard(etcd_config).start() if config.crash_guard else None
        if config.workers > 1 and config.cluster_secret:
            # started first: they load while we register (chunk/workers.py)
            group = await _start_workers(config, argv, guard, lease)

        def on_lease(lease: int) -> None:
            if guard is not None:
                guard.lease(lease, config.lease_ttl)

        # "starting" before our live record appears: waited for until our data path serves
        if config.cluster_secret:
            await restart.mark(etcd, chunk_id, "starting", config.restart_grace, time.time())
        presence = Presence(
            etcd, etcd_config, status_key(chunk_id), config.lease_ttl, render, on_lease
        )
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
            place = None
            if group is not None:
                await group.wait_started()
                place = Place(WorkerSpec(0, config.workers), group.shared, data_addresses(config))
            datapath = DataPath(config, etcd, chunk_id, alive, lease, status_changed, place)
            await datapath.start()
            if group is not None:
                group.serve_iscsi(datapath.adopt, datapath.connections, datapath.worker_for)
        else:
            log.error("no cluster_secret configured: serving neither the data port nor iSCSI")
        log.info("chunk server up", portal=portal, data=data_address, zone=config.zone)
        # Everything allocated so far (modules, config, caches loaded at start) lives as long
        # as the process: keep it out of the collector's generations, so a full collection
        # under IO load walks only what the data path allocates (docs/datapath.md).
        gc.collect()
        gc.freeze()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), config.status_interval)
            except TimeoutError:
                await presence.update()
        log.info("chunk server stopping")
        if datapath is not None:
            await datapath.stopping()  # a planned restart: expected back (docs/faults.md)
        if group is not None:
            await group.stop()
        if datapath is not None:
            await datapath.stop()
        await EVENTS.unbind()
        await presence.stop()
        if guard is not None:
            guard.keep()  # revoked just now
            await guard.close()
    await admin.close()
    return 0


async def _start_workers(
    config: ChunkConfig,
    argv: Sequence[str],
    guard: CrashGuard | None,
    lease: Callable[[], tuple[int, float]],
) -> WorkerGroup:
    """Start workers 1..N-1 under our lease (chunk/workers.py)."""

    def died() -> None:  # a worker's death is the server's: the guard revokes the lease
        group.kill_all()
        os._exit(70)

    group = WorkerGroup(argv, config.workers, guard.fd if guard is not None else None, died)
    group.listen(parse_hostport(config.iscsi_listen, "iscsi_listen"))
    await group.start(lease)
    return group


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
    return run_daemon(
        PROG, lambda stop: serve(load_daemon_config(ChunkConfig, args), stop, args_list)
    )


if __name__ == "__main__":
    sys.exit(main())
