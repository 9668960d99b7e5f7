"""Login/text keys as a data table (RFC 7143 section 13) and the target's side of negotiating them.

Each key has a value type, the RFC's result function, scope, the stages that may carry it and
who may send it. `ParamNegotiator` answers the initiator's offers from the table and the
target's own `TargetSettings`, and finally yields the frozen `SessionParams` /
`ConnectionParams` the session layer runs with.

Answers, as the RFC asks:
- unknown keys, private `X-` and `X#` keys: `NotUnderstood`;
- known values out of range, or a list with nothing acceptable: `Reject` (the default stays);
- values that do not parse (a number that is not one, a name too long...): login failure,
  initiator error (0x0200), raised as RemoteProtocolError;
- keys negotiated twice, or sent by the wrong side: initiator error (0x0200);
- obsolete marker keys (RFC 7143 13.26): IFMarker/OFMarker -> `No`, IFMarkInt/OFMarkInt ->
  `Reject`;
- leading-only keys on a connection added to an existing session: `Irrelevant`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, Flag, auto

from lunastor.iscsi.errors import LoginStatus, RejectReason, RemoteProtocolError

NOT_UNDERSTOOD = "NotUnderstood"
REJECT = "Reject"
IRRELEVANT = "Irrelevant"


class ValueType(Enum):
    NUMBER = auto()
    BOOLEAN = auto()
    LIST = auto()  # list-of-values: the responder picks the first it accepts
    TEXT = auto()


class Result(Enum):
    """How the negotiated value follows from the offer and our own value."""

    MIN = auto()
    MAX = auto()
    AND = auto()
    OR = auto()
    FIRST_ACCEPTABLE = auto()
    DECLARATIVE = auto()  # no answer: the sender states its own value
    HANDLED = auto()  # identity and security keys, handled by the login state machine


class Use(Flag):
    """Stages and phases that may carry a key."""

    SECURITY = auto()
    OPERATIONAL = auto()
    FULL_FEATURE = auto()
    LOGIN = SECURITY | OPERATIONAL
    ALL = SECURITY | OPERATIONAL | FULL_FEATURE


class Scope(Enum):
    SESSION = auto()  # SW: session-wide
    CONNECTION = auto()  # CO: connection-only


class Sender(Flag):
    INITIATOR = auto()
    TARGET = auto()
    BOTH = INITIATOR | TARGET


@dataclass(frozen=True, slots=True)
class KeyDef:
    name: str
    type: ValueType
    result: Result
    scope: Scope
    use: Use
    sender: Sender
    default: str
    min: int = 0
    max: int = 0
    values: tuple[str, ...] = ()
    leading_only: bool = False
    max_length: int = 255


MAX_SEGMENT = 2**24 - 1
_S, _C = Scope.SESSION, Scope.CONNECTION
_I, _T, _B = Sender.INITIATOR, Sender.TARGET, Sender.BOTH
_NUM, _BOOL, _LIST, _TXT = ValueType.NUMBER, ValueType.BOOLEAN, ValueType.LIST, ValueType.TEXT
_LOGIN, _ALL, _SEC, _FFP = Use.LOGIN, Use.ALL, Use.SECURITY, Use.FULL_FEATURE
_MIN, _MAX, _AND, _OR = Result.MIN, Result.MAX, Result.AND, Result.OR
_FIRST, _DECL, _HAND = Result.FIRST_ACCEPTABLE, Result.DECLARATIVE, Result.HANDLED
_LO = True  # leading only
_SEG = (512, MAX_SEGMENT)
_DIGESTS = ("CRC32C", "None")


def _key(
    name: str,
    type_: ValueType,
    result: Result,
    scope: Scope,
    use: Use,
    sender: Sender,
    default: str,
    bounds: tuple[int, int] = (0, 0),
    leading_only: bool = False,
    values: tuple[str, ...] = (),
    max_length: int = 255,
) -> KeyDef:
    lo, hi = bounds
    return KeyDef(name, type_, result, scope, use, sender, default, lo, hi, values, leading_only,
                  max_length)  # fmt: skip


# fmt: off
KEYS: dict[str, KeyDef] = {k.name: k for k in [
    #    name                        type   result scope use    sender default bounds   LO
    _key("HeaderDigest",             _LIST, _FIRST, _C, _LOGIN, _B, "None", values=_DIGESTS),
    _key("DataDigest",               _LIST, _FIRST, _C, _LOGIN, _B, "None", values=_DIGESTS),
    _key("MaxConnections",           _NUM,  _MIN,  _S, _LOGIN, _B, "1",      (1, 65535), _LO),
    _key("SendTargets",              _TXT,  _HAND, _S, _FFP,   _I, ""),
    _key("TargetName",               _TXT,  _HAND, _S, _ALL,   _B, "", max_length=223),
    _key("InitiatorName",            _TXT,  _HAND, _S, _LOGIN, _I, "", max_length=223),
    _key("TargetAlias",              _TXT,  _DECL, _S, _ALL,   _T, ""),
    _key("InitiatorAlias",           _TXT,  _DECL, _S, _ALL,   _I, ""),
    _key("TargetAddress",            _TXT,  _DECL, _S, _ALL,   _T, ""),
    _key("TargetPortalGroupTag",     _NUM,  _DECL, _S, _LOGIN, _T, "1",      (0, 65535)),
    _key("InitialR2T",               _BOOL, _OR,   _S, _LOGIN, _B, "Yes",    leading_only=_LO),
    _key("ImmediateData",            _BOOL, _AND,  _S, _LOGIN, _B, "Yes",    leading_only=_LO),
    _key("MaxRecvDataSegmentLength", _NUM,  _DECL, _C, _ALL,   _B, "8192",   _SEG),
    _key("MaxBurstLength",           _NUM,  _MIN,  _S, _LOGIN, _B, "262144", _SEG, _LO),
    _key("FirstBurstLength",         _NUM,  _MIN,  _S, _LOGIN, _B, "65536",  _SEG, _LO),
    _key("DefaultTime2Wait",         _NUM,  _MAX,  _S, _LOGIN, _B, "2",      (0, 3600), _LO),
    _key("DefaultTime2Retain",       _NUM,  _MIN,  _S, _LOGIN, _B, "20",     (0, 3600), _LO),
    _key("MaxOutstandingR2T",        _NUM,  _MIN,  _S, _LOGIN, _B, "1",      (1, 65535), _LO),
    _key("DataPDUInOrder",           _BOOL, _OR,   _S, _LOGIN, _B, "Yes",    leading_only=_LO),
    _key("DataSequenceInOrder",      _BOOL, _OR,   _S, _LOGIN, _B, "Yes",    leading_only=_LO),
    _key("ErrorRecoveryLevel",       _NUM,  _MIN,  _S, _LOGIN, _B, "0",      (0, 2), _LO),
    _key("SessionType",              _TXT,  _HAND, _S, _LOGIN, _I, "Normal", leading_only=_LO),
    _key("AuthMethod",               _LIST, _HAND, _C, _SEC,   _B, "None"),
    _key("CHAP_A",                   _LIST, _HAND, _C, _SEC,   _B, ""),
    _key("CHAP_I",                   _NUM,  _HAND, _C, _SEC,   _B, ""),
    _key("CHAP_C",                   _TXT,  _HAND, _C, _SEC,   _B, "", max_length=8192),
    _key("CHAP_N",                   _TXT,  _HAND, _C, _SEC,   _B, ""),
    _key("CHAP_R",                   _TXT,  _HAND, _C, _SEC,   _B, "", max_length=8192),
]}
# fmt: on

# RFC 7143 13.26: markers are obsolete; these are the answers it asks for.
OBSOLETE_ANSWERS = {"IFMarker": "No", "OFMarker": "No", "IFMarkInt": REJECT, "OFMarkInt": REJECT}
SECURITY_KEYS = frozenset(k for k, d in KEYS.items() if d.use == Use.SECURITY)


def login_failure(
    message: str, status: LoginStatus = LoginStatus.INITIATOR_ERROR
) -> RemoteProtocolError:
    return RemoteProtocolError(message, reason=RejectReason.PROTOCOL_ERROR, login_status=status)


def parse_number(key: str, value: str) -> int:
    """A numerical value: decimal or 0x-hex (RFC 7143 5.1). Malformed -> initiator error."""
    try:
        if value[:2] in ("0x", "0X"):
            if len(value) > 18:
                raise ValueError
            return int(value[2:], 16)
        if not value.isdecimal() or len(value) > 20:
            raise ValueError
        return int(value)
    except ValueError:
        raise login_failure(f"{key}={value[:40]!r} is not a number") from None


@dataclass(frozen=True, slots=True)
class TargetSettings:
    """Our own side of every negotiated key (what we offer or accept)."""

    max_recv_data_segment_length: int = 262144  # declared to the initiator
    max_burst_length: int = 1048576
    first_burst_length: int = 262144
    initial_r2t: bool = False  # OR: we let the initiator choose
    immediate_data: bool = True  # AND: we let the initiator choose
    max_outstanding_r2t: int = 16
    # MAX: the initiator's own wait rules. open-iscsi waits this long before it reconnects
    # after a lost connection; another access point can take the session at once
    # (docs/faults.md, "The initiator's side").
    default_time2wait: int = 0
    default_time2retain: int = 20
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    max_connections: int = 1
    digests: tuple[str, ...] = ("CRC32C", "None")  # acceptable digest values
    target_portal_group_tag: int = 1


@dataclass(frozen=True, slots=True)
class SessionParams:
    """Negotiated session-wide values (RFC 7143 section 13)."""

    session_type: str
    initiator_name: str
    target_name: str | None  # None for discovery sessions
    initiator_alias: str | None
    target_alias: str | None
    isid: int
    tsih: int
    target_portal_group_tag: int
    max_connections: int
    initial_r2t: bool
    immediate_data: bool
    max_burst_length: int
    first_burst_length: int
    default_time2wait: int
    default_time2retain: int
    max_outstanding_r2t: int
    data_pdu_in_order: bool
    data_sequence_in_order: bool
    error_recovery_level: int

    @property
    def discovery(self) -> bool:
        return self.session_type == "Discovery"


@dataclass(frozen=True, slots=True)
class ConnectionParams:
    """Negotiated per-connection values."""

    cid: int
    header_digest: bool
    data_digest: bool
    max_recv_data_segment_length: int  # what we declared: the most the initiator may send us
    max_send_data_segment_length: int  # what the initiator declared: the most we may send


class ParamNegotiator:
    """Answers operational key offers during one login (or one text exchange in FFP).

    `answer(key, value, use)` returns the value to send back, or None for declarative keys
    that need no answer. It raises RemoteProtocolError (login initiator error) for malformed
    values, repeated keys and keys the initiator may not send.
    """

    def __init__(self, settings: TargetSettings, *, leading: bool = True) -> None:
        self.settings = settings
        self.leading = leading
        self.values: dict[str, str] = {}  # negotiated values, by key, as wire strings
        self._seen: set[str] = set()

    def _ours(self, key: str) -> str:
        s = self.settings
        ours: dict[str, object] = {
            "MaxConnections": s.max_connections,
            "InitialR2T": s.initial_r2t,
            "ImmediateData": s.immediate_data,
            "MaxBurstLength": s.max_burst_length,
            "FirstBurstLength": s.first_burst_length,
            "DefaultTime2Wait": s.default_time2wait,
            "DefaultTime2Retain": s.default_time2retain,
            "MaxOutstandingR2T": s.max_outstanding_r2t,
            "DataPDUInOrder": s.data_pdu_in_order,
            "DataSequenceInOrder": s.data_sequence_in_order,
            "ErrorRecoveryLevel": s.error_recovery_level,
        }
        value = ours[key]
        if isinstance(value, bool):
            return "Yes" if value else "No"
        return str(value)

    def answer(self, key: str, value: str, use: Use) -> str | None:
        if key in OBSOLETE_ANSWERS:
            return OBSOLETE_ANSWERS[key]
        defn = KEYS.get(key)
        if defn is None or defn.result is Result.HANDLED:
            # X-/X# private keys, RFC 7144 keys and anything else we do not implement;
            # HANDLED keys reach here only in a stage that cannot carry them
            if defn is not None:
                raise login_failure(f"{key} is not allowed here")
            return NOT_UNDERSTOOD
        if key in self._seen:
            raise login_failure(f"{key} negotiated twice")
        self._seen.add(key)
        if not defn.sender & Sender.INITIATOR:
            raise login_failure(f"{key} may only be sent by the target")
        if not defn.use & use:
            return IRRELEVANT
        if len(value.encode()) > defn.max_length:
            raise login_failure(f"value of {key} longer than {defn.max_length} bytes")
        if defn.leading_only and not self.leading:
            return IRRELEVANT
        if defn.type is ValueType.NUMBER:
            number = parse_number(key, value)
            if not defn.min <= number <= defn.max:
                return REJECT
            if defn.result is Result.DECLARATIVE:
                self.values[key] = str(number)
                return None
            ours = int(self._ours(key))
            result = min(number, ours) if defn.result is Result.MIN else max(number, ours)
            self.values[key] = str(result)
            return str(result)
        if defn.type is ValueType.BOOLEAN:
            if value not in ("Yes", "No"):
                return REJECT
            ours_yes = self._ours(key) == "Yes"
            if defn.result is Result.AND:
                yes = value == "Yes" and ours_yes
            else:
                yes = value == "Yes" or ours_yes
            self.values[key] = "Yes" if yes else "No"
            return self.values[key]
        if defn.type is ValueType.LIST:
            offered = value.split(",")
            if any(not item for item in offered):
                raise login_failure(f"{key}={value!r} has an empty list item")
            acceptable = self.settings.digests
            for item in offered:
                if item in acceptable:
                    self.values[key] = item
                    return item
            return REJECT
        # declarative text (aliases)
        self.values[key] = value
        return None

    def _num(self, key: str) -> int:
        return int(self.values.get(key, KEYS[key].default))

    def _bool(self, key: str) -> bool:
        return self.values.get(key, KEYS[key].default) == "Yes"

    def session_params(
        self,
        *,
        session_type: str,
        initiator_name: str,
        target_name: str | None,
        target_alias: str | None,
        isid: int,
        tsih: int,
    ) -> SessionParams:
        max_burst = self._num("MaxBurstLength")
        return SessionParams(
            session_type=session_type,
            initiator_name=initiator_name,
            target_name=target_name,
            initiator_alias=self.values.get("InitiatorAlias"),
            target_alias=target_alias,
            isid=isid,
            tsih=tsih,
            target_portal_group_tag=self.settings.target_portal_group_tag,
            max_connections=self._num("MaxConnections"),
            initial_r2t=self._bool("InitialR2T"),
            immediate_data=self._bool("ImmediateData"),
            max_burst_length=max_burst,
            # FirstBurstLength MUST NOT exceed MaxBurstLength (13.14)
            first_burst_length=min(self._num("FirstBurstLength"), max_burst),
            default_time2wait=self._num("DefaultTime2Wait"),
            default_time2retain=self._num("DefaultTime2Retain"),
            max_outstanding_r2t=self._num("MaxOutstandingR2T"),
            data_pdu_in_order=self._bool("DataPDUInOrder"),
            data_sequence_in_order=self._bool("DataSequenceInOrder"),
            error_recovery_level=self._num("ErrorRecoveryLevel"),
        )

    def connection_params(self, *, cid: int) -> ConnectionParams:
        return ConnectionParams(
            cid=cid,
            header_digest=self.values.get("HeaderDigest") == "CRC32C",
            data_digest=self.values.get("DataDigest") == "CRC32C",
            max_recv_data_segment_length=self.settings.max_recv_data_segment_length,
            max_send_data_segment_length=self._num("MaxRecvDataSegmentLength"),
        )
