"""The leader's iSCSI portal on the VIP: discovery answered here, normal logins redirected.

Decisions (`RedirectPolicy`, pure over an `ExportIndex` and a `ServerTable`):

- discovery session: accepted (with discovery CHAP when set); SendTargets lists only the
  targets the initiator may see, each at the VIP portal with TPGT 1;
- normal session to an unknown target (no LUN, not one of our IQNs): 0x0203 not found;
- normal session, no LUN of the target published to the initiator: 0x0202 not authorized;
- normal session, no chunk server up: 0x0301 service unavailable;
- normal session otherwise: 0x0101 target moved temporarily, TargetAddress=<chunk
  portal>,1 with the server chosen by `choose_chunk_server(initiator, target, servers)`;
- discovery CHAP set but not openable here (no or another sealing key): 0x0300 target error.

"Not found" and "not authorized" are never decided on a view that lags etcd: such a refusal is
held while the view catches up (`Exports.catch_up`), and the login is run again from the start
(`LoginReplay`): a volume exported through meta is found by a login that comes at once.

The redirect comes before authentication: the chunk server it points to runs the target's
CHAP, and a redirect tells an unauthenticated initiator nothing that discovery with the
same initiator name would not.

`PortalServer` is the asyncio adapter (uvloop in the daemon) around the sans-IO
`TargetConnection`: PDUs in, Login/Text/Logout/NOP responses out. A normal session never
reaches full feature phase here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import Counter

from lunastor.common.catch_up import login_again
from lunastor.common.exports import ChapSecrets, ExportIndex, SecretUnavailable
from lunastor.iscsi.chap import ChapCredentials
from lunastor.iscsi.connection import (
    CloseConnection,
    Phase,
    SessionStarted,
    TargetConnection,
)
from lunastor.iscsi.errors import LoginStatus
from lunastor.iscsi.login import TargetDecision
from lunastor.iscsi.login_replay import LoginReplay
from lunastor.iscsi.session import SessionRegistry, SessionType, TargetInfo
from lunastor.redirector.choose import choose_chunk_server
from lunastor.redirector.servers import ServerTable

log = logging.getLogger(__name__)

TPGT = 1  # the one portal group tag of every lunastor portal (ARCHITECTURE.md)

REDIRECTS = Counter(
    "lunastor_redirector_redirects_total",
    "normal-session logins redirected, by chunk server",
    ["chunk"],
)
DISCOVERY_SESSIONS = Counter(
    "lunastor_redirector_discovery_sessions_total", "discovery sessions that logged in"
)
LOGIN_FAILURES = Counter(
    "lunastor_redirector_login_failures_total",
    "logins answered with a failure, by status (class/detail as 0xCCDD)",
    ["status"],
)


def _credentials(secrets: ChapSecrets | None) -> ChapCredentials | None:
    if secrets is None:
        return None
    return ChapCredentials(secrets.user, secrets.secret, secrets.mutual_user, secrets.mutual_secret)


class RedirectPolicy:
    """The redirector's `Portal` and `LoginPolicy`, answered from the current views.

    `index()` and `servers()` return the current (cached) read models; every call is a
    lookup, no I/O.
    """

    def __init__(
        self,
        index: Callable[[], ExportIndex],
        servers: Callable[[], ServerTable],
        vip_portal: str,
    ) -> None:
        self.index = index
        self.servers = servers
        self.vip_portal = vip_portal  # "host:port" handed out in SendTargets
        self.registry = SessionRegistry()

    # --- LoginPolicy ----------------------------------------------------------------------

    def authorize(self, initiator_name: str, target_name: str) -> TargetDecision:
        index = self.index()
        if not index.target_exists(target_name):
            return TargetDecision(LoginStatus.NOT_FOUND)
        if not index.may_see(initiator_name, target_name):
            return TargetDecision(LoginStatus.AUTHORIZATION_FAILURE)
        address = self.redirect(initiator_name, target_name)
        if address is None:
            return TargetDecision(LoginStatus.SERVICE_UNAVAILABLE)
        return TargetDecision.redirect(address)

    def authorize_discovery(self, initiator_name: str) -> TargetDecision:
        try:
            return TargetDecision(chap=self.chap(None))
        except SecretUnavailable as exc:
            log.error("refusing discovery: %s", exc)
            return TargetDecision(LoginStatus.TARGET_ERROR)

    def allocate_tsih(self, isid: int, initiator_name: str, target_name: str | None) -> int | None:
        return self.registry.allocate_tsih()

    def join_session(self, isid: int, tsih: int, cid: int, initiator_name: str) -> LoginStatus:
        # nothing to join: discovery sessions are single-connection, normal ones are redirected
        return LoginStatus.SESSION_DOES_NOT_EXIST

    # --- Portal ---------------------------------------------------------------------------

    def target_exists(self, target: str) -> bool:
        return self.index().target_exists(target)

    def may_login(self, initiator: str, target: str) -> bool:
        return self.index().may_see(initiator, target)

    def chap(self, target: str | None) -> ChapCredentials | None:
        """Discovery CHAP only: target CHAP is the chunk server's business after the
        redirect. Raises SecretUnavailable when it is set but cannot be opened."""
        return _credentials(self.index().discovery_chap()) if target is None else None

    def discoverable(self, initiator: str, portal: str) -> Sequence[TargetInfo]:
        address = f"{self.vip_portal},{TPGT}"
        return [TargetInfo(t, (address,)) for t in self.index().visible_targets(initiator)]

    def redirect(self, initiator: str, target: str) -> str | None:
        """`<chunk portal>,1` of the chunk server for (initiator, target); None if none is up."""
        table = self.servers()
        chosen = choose_chunk_server(initiator, target, table.choices)
        if chosen is None:
            return None
        REDIRECTS.labels(chosen).inc()
        return f"{table.portals[chosen]},{TPGT}"


class PortalServer:
    """Listens on the VIP portal while this instance leads."""

    def __init__(
        self,
        policy: RedirectPolicy,
        *,
        login_timeout: float = 15.0,
        catch_up: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`catch_up`: waits until the policy's views hold all that etcd holds now; a login
        refused as not found or not authorized is decided again after it."""
        self.policy = policy
        self.login_timeout = login_timeout
        self.catch_up = catch_up
        self.connections: set[PortalConnection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: PortalConnection(self), host, port, reuse_address=True
        )

    @property
    def serving(self) -> bool:
        return self._server is not None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in self._server.sockets]

    async def close(self) -> None:
        """Stop listening and drop every connection (discovery sessions end with us)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self.connections):
            conn.abort("portal closing")
        await server.wait_closed()


class PortalConnection(asyncio.Protocol):
    """One initiator connection to the portal: login, then (discovery only) text/logout."""

    def __init__(self, server: PortalServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.conn = self._new_connection()
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._replay: LoginReplay | None = None if server.catch_up is None else LoginReplay()
        self._relogin: asyncio.Task[None] | None = None

    def _new_connection(self) -> TargetConnection:
        policy = self.server.policy
        # The redirector's decisions (service unavailable, no target-side CHAP) do not fit
        # the `PortalLoginPolicy` TargetConnection builds from a Portal: give it ours.
        return TargetConnection(
            policy, policy.registry, tpgt=TPGT, now=self.loop.time(), login_policy=policy
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        # a login that never completes must not hold a connection forever
        self._timer = self.loop.call_later(self.server.login_timeout, self._login_deadline)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.last_rx = self.loop.time()
        if self._replay is not None:
            self._replay.received(data)
        conn.receive_data(data)  # framing, digests and limits are the connection's
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        self.conn.connection_lost()
        self.server.connections.discard(self)

    def _flush(self) -> None:
        conn = self.conn
        close: CloseConnection | None = None
        for event in conn.events():
            if isinstance(event, SessionStarted):
                if event.session.session_type is SessionType.DISCOVERY:
                    DISCOVERY_SESSIONS.inc()
                    if self._timer is not None:
                        self._timer.cancel()
                        self._timer = self.loop.call_later(1.0, self._tick)
                else:  # cannot happen with RedirectPolicy; never serve data here
                    close = CloseConnection("normal session on the redirector")
            elif isinstance(event, CloseConnection):
                close = event
        transport = self.transport
        if self._replay is not None and close is not None and not self._closing:
            sent = self._replay.refused(conn)
            if sent is not None and transport is not None:
                assert self.server.catch_up is not None
                self._replay = None
                self._relogin = login_again(
                    transport, self.server.catch_up, lambda: self._closing, self._login_again, sent
                )
                return
        failure = conn.login_failure
        if failure is not None:
            conn.login_failure = None
            status = (failure.status_class << 8) | failure.status_detail
            LOGIN_FAILURES.labels(f"0x{status:04x}").inc()
        bufs = conn.data_to_send()  # the connection's one output path (digests included)
        if self._replay is not None and bufs:
            self._replay = None  # answered: nothing to run again from here on
        if transport is None or self._closing:
            return
        if bufs:
            transport.writelines(bufs)
        if close is not None:
            log.debug("closing portal connection: %s", close.reason)
            self._closing = True
            transport.close()

    def _login_again(self, sent: bytes) -> None:
        """The first answer refused the login as not found or not authorized (held, not
        sent): the views caught up, run it again on a fresh `TargetConnection`."""
        self.conn = self._new_connection()
        self.data_received(sent)

    def _login_deadline(self) -> None:
        if self.conn.phase is Phase.LOGIN:
            self.abort("login not completed in time")

    def _tick(self) -> None:
        if self._closing:
            return
        self.conn.tick(self.loop.time())
        self._flush()
        self._timer = self.loop.call_later(1.0, self._tick)

    def abort(self, reason: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            log.debug("aborting portal connection: %s", reason)
            self.transport.abort()
        self._closing = True
