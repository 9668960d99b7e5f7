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
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

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


@dataclass(slots=True)
class OperationalParams:
    """The negotiated values the full feature phase needs (RFC 7143 13), with their defaults."""

    max_recv_data_segment_length: int = 8192  # the initiator's: caps our Data-In segments
    target_max_recv_data_segment_length: int = 8192  # ours: caps what the initiator sends
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    initial_r2t: bool = True
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    header_digest: bool = False
    data_digest: bool = False
    default_time2wait: int = 2
    default_time2retain: int = 0
    error_recovery_level: int = 0


@dataclass(frozen=True, slots=True)
class ChapSecrets:
    """CHAP for one target (or for discovery). `mutual_*` set: the target proves itself too."""

    username: str
    secret: bytes
    mutual_username: str | None = None
    mutual_secret: bytes | None = None


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

    def chap(self, target: str | None) -> ChapSecrets | None:
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
    params: OperationalParams = field(default_factory=OperationalParams)
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

    @property
    def nexus(self) -> Nexus:
        return Nexus(
            initiator_name=self.initiator_name,
            isid=self.isid,
            target_name=self.target_name,
            relative_port=self.relative_port,
            tpgt=self.tpgt,
        )

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

    def register(self, session: Session) -> Session | None:
        """Give `session` a fresh TSIH; return the session it reinstates, now unregistered."""
        old = self._by_key.get(session.key)
        if old is not None:
            self.remove(old)
        for tsih in self._tsih:  # 0 is reserved; skip TSIHs still in use
            if tsih not in self._by_tsih:
                break
        session.tsih = tsih
        self._by_tsih[tsih] = session
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
