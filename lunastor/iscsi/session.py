"""Session-wide iSCSI state: identity, TSIH, the CmdSN window, negotiated parameters.

A session (RFC 7143 4.4) outlives nothing here: MaxConnections=1 and ErrorRecoveryLevel=0,
so a session has exactly one connection and ends with it. It still lives in its own object
because the session registry must find it by (initiator, ISID, target) for reinstatement
and by TSIH, and because the CmdSN window is a session property.

Also here: the host interface (`Portal`) through which the connection asks who may log in
to what, with which CHAP secrets, and which targets SendTargets lists. The chunk server
fills it from etcd, the standalone target from its command line, the redirector from its
own view; the connection only reads it, synchronously.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from lunastor.iscsi.chap import ChapCredentials
from lunastor.iscsi.errors import LoginStatus
from lunastor.iscsi.login import TargetDecision
from lunastor.iscsi.params import SessionParams
from lunastor.iscsi.scsi.types import Nexus

SERIAL_HALF = 1 << 31
SERIAL_MOD = 1 << 32


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982, 32 bits): a < b."""
    return a != b and ((a < b and b - a < SERIAL_HALF) or (a > b and a - b > SERIAL_HALF))


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


def sn_add(a: int, n: int) -> int:
    return (a + n) % SERIAL_MOD


class SessionType(Enum):
    NORMAL = "Normal"
    DISCOVERY = "Discovery"


@dataclass(frozen=True, slots=True)
class TargetInfo:
    """One target as SendTargets reports it: name and portal addresses ("host:port,tpgt")."""

    name: str
    addresses: tuple[str, ...]


class Portal(Protocol):
    """What the host tells the login and discovery code. Every method is a cheap lookup."""

    def target_exists(self, target: str) -> bool: ...

    def may_login(self, initiator: str, target: str) -> bool:
        """Whether `initiator` may open a normal session to `target` (LUN masking, ACLs)."""
        ...

    def chap(self, target: str | None) -> ChapCredentials | None:
        """CHAP required for `target` (None: for discovery sessions); None: no CHAP."""
        ...

    def discoverable(self, initiator: str, portal: str) -> Sequence[TargetInfo]:
        """The targets SendTargets=All lists for `initiator` (only those it may log in to).

        `portal` is our side of the asking connection ("host:port", "[v6]:port"), the
        natural TargetAddress when the host has no better one."""
        ...

    def redirect(self, initiator: str, target: str) -> str | None:
        """A TargetAddress to redirect a normal-session login to, or None to accept it here."""
        ...


@dataclass(eq=False, slots=True)
class Session:
    """One iSCSI session (one connection, ERL 0)."""

    initiator_name: str
    isid: int
    target_name: str  # "" for discovery sessions
    session_type: SessionType
    tsih: int = 0
    params: SessionParams | None = None  # negotiated at login (None only in tests)
    queue_depth: int = 128
    # CmdSN window (RFC 7143 4.2.2.1). exp_cmd_sn: next CmdSN to deliver for execution.
    # max_cmd_sn advances only when a non-immediate command completes, so at most
    # `queue_depth` non-immediate commands are ever accepted but unanswered.
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    relative_port: int = 1
    tpgt: int = 1
    closed: bool = False

    def start_window(self, cmd_sn: int) -> None:
        self.exp_cmd_sn = cmd_sn
        self.max_cmd_sn = sn_add(cmd_sn, self.queue_depth - 1)

    _nexus: Nexus | None = None

    @property
    def nexus(self) -> Nexus:
        """The I_T nexus (built once: every command carries it)."""
        nexus = self._nexus
        if nexus is None:
            nexus = self._nexus = Nexus(
                initiator_name=self.initiator_name,
                isid=self.isid,
                target_name=self.target_name,
                relative_port=self.relative_port,
                tpgt=self.tpgt,
            )
        return nexus

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.initiator_name, self.isid, self.target_name)


class SessionRegistry:
    """The sessions of one portal group, by TSIH and by (initiator, ISID, target).

    Pure bookkeeping: `register` says which older session a new login reinstates; the host
    closes that session's connection and tells the SCSI layer the nexus is gone.
    """

    def __init__(self) -> None:
        self._by_tsih: dict[int, Session] = {}
        self._by_key: dict[tuple[str, int, str], Session] = {}
        self._tsih = itertools.cycle(range(1, 0x10000))

    def __len__(self) -> int:
        return len(self._by_tsih)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_tsih.values()))

    def get(self, tsih: int) -> Session | None:
        return self._by_tsih.get(tsih)

    def find(self, initiator: str, isid: int, target: str) -> Session | None:
        return self._by_key.get((initiator, isid, target))

    def allocate_tsih(self) -> int | None:
        """A TSIH no registered session uses (1..65535), or None when all are taken."""
        if len(self._by_tsih) >= 0xFFFF:
            return None
        for tsih in self._tsih:
            if tsih not in self._by_tsih:
                return tsih
        return None  # pragma: no cover - the cycle is infinite

    def register(self, session: Session) -> Session | None:
        """Record `session` (with its TSIH from `allocate_tsih`, or a fresh one); return the
        session it reinstates (same initiator, ISID and target), now unregistered."""
        old = self._by_key.get(session.key)
        if old is not None:
            self.remove(old)
        if session.tsih == 0 or session.tsih in self._by_tsih:
            session.tsih = self.allocate_tsih() or 0
        self._by_tsih[session.tsih] = session
        self._by_key[session.key] = session
        return old

    def remove(self, session: Session) -> None:
        if self._by_tsih.get(session.tsih) is session:
            del self._by_tsih[session.tsih]
        if self._by_key.get(session.key) is session:
            del self._by_key[session.key]
        session.closed = True

    def for_target(self, target: str) -> list[Session]:
        return [s for s in self._by_tsih.values() if s.target_name == target]


class PortalLoginPolicy:
    """The login negotiator's `LoginPolicy`, answered from a host `Portal` and the registry."""

    def __init__(self, portal: Portal, registry: SessionRegistry) -> None:
        self.portal = portal
        self.registry = registry

    def authorize(self, initiator_name: str, target_name: str) -> TargetDecision:
        portal = self.portal
        if not portal.target_exists(target_name):
            return TargetDecision(LoginStatus.NOT_FOUND)
        if not portal.may_login(initiator_name, target_name):
            return TargetDecision(LoginStatus.AUTHORIZATION_FAILURE)
        address = portal.redirect(initiator_name, target_name)
        if address is not None:
            return TargetDecision.redirect(address)
        return TargetDecision(chap=portal.chap(target_name))

    def authorize_discovery(self, initiator_name: str) -> TargetDecision:
        return TargetDecision(chap=self.portal.chap(None))

    def allocate_tsih(self, isid: int, initiator_name: str, target_name: str | None) -> int | None:
        return self.registry.allocate_tsih()

    def join_session(self, isid: int, tsih: int, cid: int, initiator_name: str) -> LoginStatus:
        # MaxConnections=1 and ErrorRecoveryLevel=0: no second connection, and connection
        # reinstatement is session reinstatement (a login with TSIH 0)
        session = self.registry.get(tsih)
        if session is None or (session.initiator_name, session.isid) != (initiator_name, isid):
            return LoginStatus.SESSION_DOES_NOT_EXIST
        return LoginStatus.TOO_MANY_CONNECTIONS
