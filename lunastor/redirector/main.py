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
from lunastor.common.exports import Exports
from lunastor.common.logs import get_logger, setup_logging
from lunastor.common.metrics import add_admin_routes, describe_daemon
from lunastor.common.presence import Presence
from lunastor.common.records import Keys, RedirectorInstance
from lunastor.common.sealing import Sealer
from lunastor.common.settings import etcd_client_config
from lunastor.redirector.config import RedirectorConfig
from lunastor.redirector.portal import PortalServer, RedirectPolicy
from lunastor.redirector.servers import ChunkServers
from lunastor.redirector.vip import VipError, VipManager
from lunastor.redirector.watchdog import Watchdog

PROG = "lunastor-redirector"
LEADER = Gauge("lunastor_redirector_leader", "1 while this instance leads (and may hold the VIP)")
LEADER_CHANGES = Counter(
    "lunastor_redirector_leader_changes_total",
    "times this instance became or stopped being the leader",
)
VIP_HELD = Gauge(
    "lunastor_redirector_vip_held", "1 while this instance holds the VIP and serves the portal"
)
POLL = 0.05  # how often the leader checks its lease deadline
# seconds a login refused on views that may lag etcd waits for them (less than login_timeout)
CATCH_UP_TIMEOUT = 10.0


class Leadership:
    """What the leader holds: the VIP (when managed) and the portal bound on it."""

    def __init__(
        self, config: RedirectorConfig, portal: PortalServer, vip: VipManager | None
    ) -> None:
        self.config = config
        self.portal = portal
        self.vip = vip
        self.watchdog = Watchdog(vip.prefix, vip.interface) if vip is not None else None
        self.log = get_logger(component="leadership")

    async def take(self, until: float) -> None:
        """Start the watchdog (it may let us hold the VIP until `until`), add the VIP, then
        bind the portal on it; a failure is logged and retried by `retry()` while we lead."""
        if self.watchdog is not None:
            await self.watchdog.start(until)
        if self.vip is not None:
            # acquire() adds the address, then spends ~0.4 s announcing it: bind as soon as
            # the address is there instead of after the announcements
            acquiring = asyncio.create_task(self.vip.acquire())
            while not acquiring.done() and not await self._vip_present():
                await asyncio.sleep(0.01)
            if not acquiring.done():
                await self.retry()
            try:
                await acquiring
            except VipError as exc:
                self.log.error("cannot take the VIP", error=str(exc))
                return
        await self.retry()

    async def _vip_present(self) -> bool:
        assert self.vip is not None
        try:
            return await self.vip.held()
        except VipError:
            return False

    async def retry(self) -> None:
        if self.portal.serving:
            return
        if self.vip is not None and not await self.vip.held():
            try:
                await self.vip.acquire()
            except VipError as exc:
                self.log.error("cannot take the VIP", error=str(exc))
                return
        try:
            await self.portal.start(self.config.vip, self.config.portal_port)
        except OSError as exc:
            self.log.error("cannot bind the portal", portal=self.config.portal, error=str(exc))
            return
        VIP_HELD.set(1)
        self.log.info("serving the portal", portal=self.config.portal)

    async def give_up(self) -> None:
        """Stop serving first (no new logins on a VIP about to move), then drop the VIP."""
        VIP_HELD.set(0)
        await self.portal.close()
        if self.vip is not None:
            try:
                await self.vip.release()
            except VipError as exc:
                self.log.error("cannot release the VIP", error=str(exc))
        if self.watchdog is not None:
            await self.watchdog.stop()

    def renew(self, until: float) -> bool:
        """Extend the watchdog's permission; False if it already dropped the VIP (our loop
        stalled past the last permission)."""
        if self.watchdog is None:
            return True
        if self.watchdog.lapsed:
            return False
        self.watchdog.renew(until)
        return True


def hold_until(presence: Presence, margin: float) -> float:
    """The `time.monotonic()` moment until which we may hold the VIP: the lease deadline
    less the margin (0 without a lease)."""
    keeper = presence.keeper
    return keeper.deadline() - margin if keeper is not None else 0.0


def lease_margin_left(presence: Presence, margin: float) -> bool:
    """True while our lease surely outlives `margin` seconds from now.

    `LeaseKeeper.deadline()` is the send time of the last answered keep-alive plus the TTL,
    never later than etcd's own expiry of the lease, so "deadline - margin" is a moment at
    which etcd still holds our election key and nobody else can have become leader.
    """
    keeper = presence.keeper
    return (
        presence.held.is_set()
        and keeper is not None
        and not keeper.lost.is_set()
        and time.monotonic() < keeper.deadline() - margin
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
    sealer = Sealer(config.secret_key) if config.secret_key else None
    margin = config.release_margin

    async with await Etcd.connect(etcd_config) as etcd:
        presence = Presence(
            etcd,
            etcd_config,
            Keys.LIVE_REDIRECTORS + instance,
            config.lease_ttl,
            lambda lease: record.to_json(),
        )
        # every instance follows the records, so a new leader answers from a warm view
        exports = await Exports(etcd, sealer).start()
        servers = await ChunkServers(etcd).start()
        policy = RedirectPolicy(lambda: exports.index, lambda: servers.table, config.portal)
        portal = PortalServer(
            policy,
            login_timeout=config.login_timeout,
            catch_up=lambda: exports.catch_up(CATCH_UP_TIMEOUT),
        )
        leadership = Leadership(config, portal, vip)

        async def health() -> dict[str, Any]:
            held = presence.held.is_set()
            stale = exports.error or servers.error
            return {
                "status": "ok" if held and stale is None else "degraded",
                "views": "ok" if stale is None else f"stale: {stale}",
                "id": instance,
                "lease": held,
                "leader": leading,
                "serving": portal.serving,
                "chunk_servers_up": servers.table.up,
                "version": lunastor.__version__,
            }

        app = web.Application()
        add_admin_routes(app, health)
        admin = await start_http(app, config.admin_listen, "admin_listen")
        await presence.start()
        stopping = asyncio.create_task(stop.wait())
        while not stop.is_set():
            # campaign only on a lease with room to spare, or we would step down at once
            while not stop.is_set() and not lease_margin_left(presence, margin):
                await asyncio.sleep(POLL)
            if stop.is_set():
                break
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
                continue
            if not lease_margin_left(presence, margin):
                # won on a lease about to run out: do not take the VIP we would have to drop
                log.warning("elected on a lease near its deadline; not taking the VIP")
                continue
            leading = True
            LEADER.set(1)
            LEADER_CHANGES.inc()
            log.info("became leader", vip=config.portal)
            await leadership.take(hold_until(presence, margin))
            retry_at = time.monotonic() + 1.0
            lapsed = False
            while not stop.is_set() and lease_margin_left(presence, margin):
                if not leadership.renew(hold_until(presence, margin)):
                    lapsed = True
                    break
                if not portal.serving and time.monotonic() >= retry_at:
                    await leadership.retry()
                    retry_at = time.monotonic() + 1.0
                await asyncio.sleep(POLL)
            await leadership.give_up()
            leading = False
            LEADER.set(0)
            LEADER_CHANGES.inc()
            if stop.is_set():
                reason = "stopping"
            elif lapsed:
                reason = "watchdog dropped the VIP (this process stalled)"
            elif presence.held.is_set():
                reason = "lease near its deadline"  # keep-alives failing: etcd out of reach
            else:
                reason = "lease lost"
            log.info("stopped leading", reason=reason)
            # Let the next candidate in now rather than at lease expiry; if etcd is out of
            # reach this fails, and expiry removes our key instead.
            with contextlib.suppress(EtcdError, TimeoutError):
                await asyncio.wait_for(election.resign(), timeout=config.lease_ttl)
        stopping.cancel()
        await portal.close()
        await servers.stop()
        await exports.stop()
        await presence.stop()
        await admin.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_argparser(PROG, "lunastor iSCSI redirector: the VIP portal's leader.")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_daemon(PROG, lambda stop: serve(load_daemon_config(RedirectorConfig, args), stop))


if __name__ == "__main__":
    sys.exit(main())
