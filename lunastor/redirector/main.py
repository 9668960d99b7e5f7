"""`lunastor-redirector`: campaigns for leadership; the leader serves the VIP portal."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from prometheus_client import Counter, Gauge

import lunastor
from lunastor.common.daemon import config_argparser, load_daemon_config, run_daemon, start_http
from lunastor.common.etcd import Election, Etcd, EtcdError
from lunastor.common.logs import setup_logging
from lunastor.common.metrics import add_admin_routes, describe_daemon
from lunastor.common.presence import Presence
from lunastor.common.records import Keys, RedirectorInstance
from lunastor.common.settings import etcd_client_config
from lunastor.redirector.config import RedirectorConfig
from lunastor.redirector.vip import VipError, VipManager

PROG = "lunastor-redirector"
LEADER = Gauge("lunastor_redirector_leader", "1 while this instance leads (and may hold the VIP)")
LEADER_CHANGES = Counter(
    "lunastor_redirector_leader_changes_total",
    "times this instance became or stopped being the leader",
)


async def serve(config: RedirectorConfig, stop: asyncio.Event) -> int:
    instance = config.instance_id
    log = setup_logging(config.log, "redirector", instance=instance)
    describe_daemon("redirector")
    etcd_config = etcd_client_config(config.etcd)
    record = RedirectorInstance(
        id=instance,
        vip=config.portal,
        admin_address=config.admin_listen,
        version=lunastor.__version__,
        started_at=time.time(),
    )
    leading = False
    vip = VipManager(config.vip, config.interface) if config.manage_vip else None
    if vip is not None and await vip.held():
        # A predecessor killed before it could clean up left the VIP behind: a non-leader must
        # never hold it, so drop it before campaigning.
        log.warning("removing a VIP left behind", vip=config.vip, interface=config.interface)
        await vip.release()

    async with await Etcd.connect(etcd_config) as etcd:
        presence = Presence(
            etcd,
            etcd_config,
            Keys.LIVE_REDIRECTORS + instance,
            config.lease_ttl,
            lambda lease: record.to_json(),
        )

        async def health() -> dict[str, Any]:
            held = presence.held.is_set()
            return {
                "status": "ok" if held else "degraded",
                "id": instance,
                "lease": held,
                "leader": leading,
                "version": lunastor.__version__,
            }

        app = web.Application()
        add_admin_routes(app, health)
        admin = await start_http(app, config.admin_listen, "admin_listen")
        await presence.start()
        stopping = asyncio.create_task(stop.wait())
        while not stop.is_set():
            election = Election(
                etcd, Keys.REDIRECTOR_ELECTION, instance.encode(), presence.lease_id
            )
            campaign = asyncio.create_task(election.campaign())
            await asyncio.wait({campaign, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not campaign.done():
                campaign.cancel()
                with contextlib.suppress(asyncio.CancelledError, EtcdError):
                    await campaign
                break
            try:
                campaign.result()
            except EtcdError as exc:  # lease lost while waiting: campaign again on a new one
                log.warning("campaign interrupted", error=str(exc))
                await presence.held.wait()
                continue
            leading = True
            LEADER.set(1)
            LEADER_CHANGES.inc()
            log.info("became leader", vip=config.portal)
            if vip is not None:
                try:
                    await vip.acquire()
                except VipError as exc:
                    log.error("cannot take the VIP", error=str(exc))
            lost = asyncio.create_task(_lease_lost(presence))
            await asyncio.wait({lost, stopping}, return_when=asyncio.FIRST_COMPLETED)
            lost.cancel()
            if vip is not None:
                try:
                    await vip.release()
                except VipError as exc:
                    log.error("cannot release the VIP", error=str(exc))
            leading = False
            LEADER.set(0)
            LEADER_CHANGES.inc()
            log.info("stopped leading", reason="stopping" if stop.is_set() else "lease lost")
            if stop.is_set():
                with contextlib.suppress(EtcdError):
                    await election.resign()
            else:
                await presence.held.wait()
        stopping.cancel()
        await presence.stop()
        await admin.cleanup()
    return 0


async def _lease_lost(presence: Presence) -> None:
    while presence.held.is_set():
        await asyncio.sleep(0.2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_argparser(PROG, "lunastor iSCSI redirector: the VIP portal's leader.")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_daemon(PROG, lambda stop: serve(load_daemon_config(RedirectorConfig, args), stop))


if __name__ == "__main__":
    sys.exit(main())
