"""The target's side of the login phase (RFC 7143 6 and 13; CHAP per 12.1.3 / RFC 1994).

`TargetLogin.step(request)` takes one Login Request and returns the Login Response(s) to send
and, once the initiator reaches full feature phase, the negotiated result. It checks the
stage transitions, ISID/TSIH and version fields, asks the host's `Portal` who may log in to
what, runs CHAP when the portal asks for it, and negotiates the operational keys from a
table of (kind, our value) entries.

Interim: the pdu helper's `login.py`/`params.py`/`chap.py` are meant to take over the key
negotiation and CHAP; this module is the connection-side glue that drives them, with a
minimal negotiator of its own so that the session layer can be tested end to end.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from lunastor.iscsi import pdu as p
from lunastor.iscsi.errors import LoginStatus, RemoteProtocolError
from lunastor.iscsi.session import ChapSecrets, OperationalParams, Portal, SessionType
from lunastor.iscsi.text import encode_text, parse_text

SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
LOGIN_MAX_DATA = 8192  # MaxRecvDataSegmentLength during login (RFC 7143 13.12)


class LoginFailed(Exception):
    def __init__(self, status: LoginStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class LoginResult:
    """What the session needs once login succeeded."""

    initiator_name: str
    target_name: str
    session_type: SessionType
    isid: int
    tsih: int  # 0: a new session
    cid: int
    cmd_sn: int
    params: OperationalParams


@dataclass(slots=True)
class LoginStep:
    responses: list[p.LoginResponse] = field(default_factory=list)
    failed: str | None = None  # set: send `responses`, then close
    done: LoginResult | None = None  # set: the last response moves to full feature phase


# Operational keys: name -> (kind, our offer). Kinds are RFC 7143 result functions.
_NUMERIC_MIN, _NUMERIC_MAX, _BOOL_OR, _BOOL_AND, _DECLARATIVE, _LIST = range(6)
_OUR_OFFER: dict[str, tuple[int, str]] = {
    "HeaderDigest": (_LIST, "None,CRC32C"),
    "DataDigest": (_LIST, "None,CRC32C"),
    "MaxConnections": (_NUMERIC_MIN, "1"),
    "InitialR2T": (_BOOL_OR, "No"),
    "ImmediateData": (_BOOL_AND, "Yes"),
    "MaxBurstLength": (_NUMERIC_MIN, "1048576"),
    "FirstBurstLength": (_NUMERIC_MIN, "262144"),
    "DefaultTime2Wait": (_NUMERIC_MAX, "2"),
    "DefaultTime2Retain": (_NUMERIC_MIN, "0"),
    "MaxOutstandingR2T": (_NUMERIC_MIN, "8"),
    "DataPDUInOrder": (_BOOL_OR, "Yes"),
    "DataSequenceInOrder": (_BOOL_OR, "Yes"),
    "ErrorRecoveryLevel": (_NUMERIC_MIN, "0"),
    "IFMarker": (_BOOL_AND, "No"),
    "OFMarker": (_BOOL_AND, "No"),
    "MaxRecvDataSegmentLength": (_DECLARATIVE, ""),
}
_LIMITS = {
    "MaxConnections": (1, 65535),
    "MaxBurstLength": (512, 16777215),
    "FirstBurstLength": (512, 16777215),
    "MaxRecvDataSegmentLength": (512, 16777215),
    "DefaultTime2Wait": (0, 3600),
    "DefaultTime2Retain": (0, 3600),
    "MaxOutstandingR2T": (1, 65535),
    "ErrorRecoveryLevel": (0, 2),
}
_IGNORED = {"InitiatorAlias", "TargetAlias", "TargetPortalGroupTag"}
_DECLARED_ONCE = {"InitiatorName", "SessionType", "TargetName"}


class TargetLogin:
    """One connection's login. `random` is injectable so that tests can pin challenges."""

    def __init__(
        self,
        portal: Portal,
        *,
        tpgt: int = 1,
        target_mrdsl: int = 262144,
        queue_depth: int = 128,
        random: Callable[[int], bytes] = os.urandom,
        stat_sn: int = 0,
    ) -> None:
        self.portal = portal
        self.tpgt = tpgt
        self.target_mrdsl = target_mrdsl
        self.queue_depth = queue_depth
        self.random = random
        self.stat_sn = stat_sn
        self.stage = SECURITY
        self.first: p.LoginRequest | None = None
        self.partial = bytearray()  # text of a request continued with the C bit
        self.keys: dict[str, str] = {}
        self.initiator = ""
        self.target = ""
        self.session_type = SessionType.NORMAL
        self.chap: ChapSecrets | None = None
        self.auth_done = False
        self.chap_state = "start"  # start -> method -> challenged -> done
        self.chap_id = 0
        self.chap_challenge = b""
        self.tpgt_sent = False
        self.params = OperationalParams(target_max_recv_data_segment_length=target_mrdsl)
        self.cmd_sn = 0

    # --- public ---------------------------------------------------------------------------

    def step(self, req: p.LoginRequest) -> LoginStep:
        try:
            return self._step(req)
        except LoginFailed as exc:
            return LoginStep([self._response(req, status=exc.status)], failed=str(exc))
        except RemoteProtocolError as exc:
            return LoginStep([self._response(req, status=exc.login_status)], failed=str(exc))

    # --- the state machine ----------------------------------------------------------------

    def _step(self, req: p.LoginRequest) -> LoginStep:
        first = self.first
        if first is None:
            if req.version_min > 0:
                raise LoginFailed(LoginStatus.UNSUPPORTED_VERSION, "version_min > 0")
            self.first = first = req
        elif req.isid != first.isid or req.tsih != first.tsih or req.cid != first.cid:
            raise LoginFailed(LoginStatus.INITIATOR_ERROR, "ISID/TSIH/CID changed during login")
        self.cmd_sn = req.cmdsn
        if req.csg != self.stage and not (self.stage == SECURITY and req.csg == OPERATIONAL):
            raise LoginFailed(LoginStatus.INITIATOR_ERROR, f"login stage {req.csg} out of order")
        if req.csg == OPERATIONAL and self.stage == SECURITY:
            # the initiator skipped security negotiation
            self._identify(parse_text(bytes(self.partial) + bytes(req.data)), peek=True)
            if self._chap_for() is not None:
                raise LoginFailed(LoginStatus.AUTHENTICATION_FAILURE, "CHAP required")
            self.stage = OPERATIONAL
        if req.cont:
            self.partial += req.data
            if len(self.partial) > 64 * 1024:
                raise LoginFailed(LoginStatus.OUT_OF_RESOURCES, "login text too long")
            return LoginStep([self._response(req, csg=self.stage, nsg=self.stage)])
        text = bytes(self.partial) + bytes(req.data)
        self.partial.clear()
        pairs = parse_text(text)
        if self.initiator == "":
            self._identify(pairs, peek=False)
        answer: list[tuple[str, str]] = []
        if self.stage == SECURITY:
            answer += self._security(pairs)
            ready = self.auth_done
        else:
            answer += self._operational(pairs)
            ready = True
        if not self.tpgt_sent and self.session_type is SessionType.NORMAL:
            answer.append(("TargetPortalGroupTag", str(self.tpgt)))
            self.tpgt_sent = True
        transit = False
        nsg = self.stage
        if req.transit and ready:
            if req.nsg not in (OPERATIONAL, FULL_FEATURE) or req.nsg <= self.stage:
                raise LoginFailed(LoginStatus.INITIATOR_ERROR, f"bad next stage {req.nsg}")
            transit, nsg = True, req.nsg
        csg = self.stage
        redirect = None
        if transit and self.session_type is SessionType.NORMAL and nsg == FULL_FEATURE:
            redirect = self.portal.redirect(self.initiator, self.target)
        if redirect is not None:
            resp = self._response(
                req,
                status=LoginStatus.TARGET_MOVED_TEMPORARILY,
                data=encode_text([("TargetAddress", redirect)]),
            )
            return LoginStep([resp], failed=f"redirected to {redirect}")
        data = encode_text(answer)
        if len(data) > LOGIN_MAX_DATA:
            raise LoginFailed(LoginStatus.OUT_OF_RESOURCES, "login response too long")
        resp = self._response(req, transit=transit, csg=csg, nsg=nsg, data=data)
        if transit:
            self.stage = nsg
        step = LoginStep([resp])
        if transit and nsg == FULL_FEATURE:
            if self.params.first_burst_length > self.params.max_burst_length:
                self.params.first_burst_length = self.params.max_burst_length
            step.done = LoginResult(
                initiator_name=self.initiator,
                target_name=self.target,
                session_type=self.session_type,
                isid=first.isid,
                tsih=first.tsih,
                cid=first.cid,
                cmd_sn=req.cmdsn,
                params=self.params,
            )
        return step

    def _identify(self, pairs: list[tuple[str, str]], *, peek: bool) -> None:
        """Who is logging in to what, from the first request's keys; check the policy."""
        keys = dict(pairs)
        initiator = keys.get("InitiatorName", "")
        if not initiator:
            raise LoginFailed(LoginStatus.MISSING_PARAMETER, "no InitiatorName")
        stype = keys.get("SessionType", "Normal")
        if stype not in ("Normal", "Discovery"):
            raise LoginFailed(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, f"SessionType={stype}")
        session_type = SessionType(stype)
        target = keys.get("TargetName", "")
        if session_type is SessionType.NORMAL:
            if not target:
                raise LoginFailed(LoginStatus.MISSING_PARAMETER, "no TargetName")
            if not self.portal.target_exists(target):
                raise LoginFailed(LoginStatus.NOT_FOUND, f"no target {target}")
            if not self.portal.may_login(initiator, target):
                raise LoginFailed(
                    LoginStatus.AUTHORIZATION_FAILURE, f"{initiator} may not log in to {target}"
                )
        else:
            target = ""
        self.initiator, self.target, self.session_type = initiator, target, session_type

    def _chap_for(self) -> ChapSecrets | None:
        return self.portal.chap(self.target if self.session_type is SessionType.NORMAL else None)

    # --- security stage -------------------------------------------------------------------

    def _security(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        answer: list[tuple[str, str]] = []
        keys = dict(pairs)
        if self.chap_state == "start":
            self.chap = self._chap_for()
            offered = keys.get("AuthMethod", "None").split(",")
            if self.chap is not None:
                if "CHAP" not in offered:
                    raise LoginFailed(LoginStatus.AUTHENTICATION_FAILURE, "CHAP required")
                answer.append(("AuthMethod", "CHAP"))
                self.chap_state = "method"
            else:
                if "None" not in offered:
                    raise LoginFailed(LoginStatus.AUTHENTICATION_FAILURE, "no common AuthMethod")
                if "AuthMethod" in keys:
                    answer.append(("AuthMethod", "None"))
                self.auth_done = True
                self.chap_state = "done"
        elif self.chap_state == "method":
            if "CHAP_A" not in keys:
                return answer  # nothing new yet
            if "5" not in keys["CHAP_A"].split(","):
                raise LoginFailed(LoginStatus.AUTHENTICATION_FAILURE, "CHAP_A without MD5")
            self.chap_id = self.random(1)[0]
            self.chap_challenge = self.random(16)
            answer += [
                ("CHAP_A", "5"),
                ("CHAP_I", str(self.chap_id)),
                ("CHAP_C", "0x" + self.chap_challenge.hex()),
            ]
            self.chap_state = "challenged"
        elif self.chap_state == "challenged":
            answer += self._chap_verify(keys)
            self.auth_done = True
            self.chap_state = "done"
        for key, _ in pairs:  # operational keys may ride along in the security stage
            if key in _OUR_OFFER:
                answer += self._negotiate(key, keys[key])
        return answer

    def _chap_verify(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        chap = self.chap
        assert chap is not None
        name = keys.get("CHAP_N")
        response = keys.get("CHAP_R")
        if name is None or response is None:
            raise LoginFailed(LoginStatus.AUTHENTICATION_FAILURE, "CHAP_N/CHAP_R missing")
        expected = hashlib.md5(
            bytes([self.chap_id]) + chap.secret + self.chap_challenge, usedforsecurity=False
        ).digest()
        got = _chap_binary(response)
        if name != chap.username or not hmac.compare_digest(got, expected):
            raise LoginFailed(LoginStatus.AUTHENTICATION_FAILURE, "CHAP response mismatch")
        if "CHAP_I" not in keys and "CHAP_C" not in keys:
            return []
        # mutual CHAP: the initiator challenges us
        if chap.mutual_secret is None or chap.mutual_username is None:
            raise LoginFailed(LoginStatus.AUTHENTICATION_FAILURE, "mutual CHAP not configured")
        try:
            ident = int(keys.get("CHAP_I", ""), 0)
        except ValueError:
            raise LoginFailed(LoginStatus.AUTHENTICATION_FAILURE, "bad CHAP_I") from None
        challenge = _chap_binary(keys.get("CHAP_C", ""))
        if not 0 <= ident <= 255 or not challenge or challenge == self.chap_challenge:
            raise LoginFailed(LoginStatus.AUTHENTICATION_FAILURE, "bad mutual CHAP challenge")
        answer = hashlib.md5(
            bytes([ident]) + chap.mutual_secret + challenge, usedforsecurity=False
        ).digest()
        return [("CHAP_N", chap.mutual_username), ("CHAP_R", "0x" + answer.hex())]

    # --- operational stage ----------------------------------------------------------------

    def _operational(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        answer: list[tuple[str, str]] = []
        for key, value in pairs:
            if key in _DECLARED_ONCE or key in _IGNORED or key.startswith("X-"):
                continue
            if key in _OUR_OFFER:
                answer += self._negotiate(key, value)
            elif key in ("AuthMethod",) or key.startswith("CHAP_"):
                raise LoginFailed(LoginStatus.INITIATOR_ERROR, f"{key} in operational stage")
            else:
                answer.append((key, "NotUnderstood"))
        if "MaxRecvDataSegmentLength" not in self.keys:
            self.keys["MaxRecvDataSegmentLength"] = "sent"
            answer.append(("MaxRecvDataSegmentLength", str(self.target_mrdsl)))
        return answer

    def _negotiate(self, key: str, value: str) -> list[tuple[str, str]]:
        kind, ours = _OUR_OFFER[key]
        prm = self.params
        if kind == _DECLARATIVE:
            prm.max_recv_data_segment_length = self._number(key, value)
            if "MaxRecvDataSegmentLength" not in self.keys:
                self.keys[key] = "sent"
                return [(key, str(self.target_mrdsl))]
            return []
        if kind == _LIST:
            choice = next((v for v in ours.split(",") if v in value.split(",")), None)
            if choice is None:
                return [(key, "Reject")]
            on = choice == "CRC32C"
            if key == "HeaderDigest":
                prm.header_digest = on
            else:
                prm.data_digest = on
            return [(key, choice)]
        if kind in (_BOOL_OR, _BOOL_AND):
            if value not in ("Yes", "No"):
                return [(key, "Reject")]
            theirs = value == "Yes"
            mine = ours == "Yes"
            result = (theirs or mine) if kind == _BOOL_OR else (theirs and mine)
            attr = _BOOL_ATTR.get(key)
            if attr is not None:
                setattr(prm, attr, result)
            return [(key, "Yes" if result else "No")]
        n = self._number(key, value)
        number = min(n, int(ours)) if kind == _NUMERIC_MIN else max(n, int(ours))
        attr = _NUM_ATTR.get(key)
        if attr is not None:
            setattr(prm, attr, number)
        return [(key, str(number))]

    def _number(self, key: str, value: str) -> int:
        try:
            n = int(value, 0)
        except ValueError:
            raise LoginFailed(LoginStatus.INITIATOR_ERROR, f"{key}={value!r}") from None
        lo, hi = _LIMITS.get(key, (0, 1 << 32))
        if not lo <= n <= hi:
            raise LoginFailed(LoginStatus.INITIATOR_ERROR, f"{key}={n} out of range")
        return n

    # --- responses ------------------------------------------------------------------------

    def _response(
        self,
        req: p.LoginRequest,
        *,
        status: LoginStatus = LoginStatus.SUCCESS,
        transit: bool = False,
        csg: int | None = None,
        nsg: int | None = None,
        data: bytes = b"",
    ) -> p.LoginResponse:
        stage = self.stage if req.csg not in (SECURITY, OPERATIONAL) else req.csg
        sn = self.stat_sn
        self.stat_sn = (sn + 1) & 0xFFFFFFFF
        return p.LoginResponse(
            transit=transit,
            csg=stage if csg is None else csg,
            nsg=(stage if nsg is None else nsg) if transit else 0,
            version_max=0,
            version_active=0,
            isid=req.isid,
            tsih=req.tsih,
            itt=req.itt,
            statsn=sn,
            expcmdsn=req.cmdsn,
            maxcmdsn=(req.cmdsn + self.queue_depth - 1) & 0xFFFFFFFF,
            status_class=status.status_class,
            status_detail=status.status_detail,
            data=data,
        )


_BOOL_ATTR = {
    "InitialR2T": "initial_r2t",
    "ImmediateData": "immediate_data",
    "DataPDUInOrder": "data_pdu_in_order",
    "DataSequenceInOrder": "data_sequence_in_order",
}
_NUM_ATTR = {
    "MaxBurstLength": "max_burst_length",
    "FirstBurstLength": "first_burst_length",
    "DefaultTime2Wait": "default_time2wait",
    "DefaultTime2Retain": "default_time2retain",
    "MaxOutstandingR2T": "max_outstanding_r2t",
    "ErrorRecoveryLevel": "error_recovery_level",
}


def _chap_binary(value: str) -> bytes:
    """CHAP_R / CHAP_C values: 0x<hex> or 0b<base64> (RFC 7143 6.1)."""
    try:
        if value[:2] in ("0x", "0X"):
            return bytes.fromhex(value[2:])
        if value[:2] in ("0b", "0B"):
            return base64.b64decode(value[2:], validate=True)
    except ValueError:
        pass
    raise LoginFailed(LoginStatus.AUTHENTICATION_FAILURE, "bad CHAP binary value")
