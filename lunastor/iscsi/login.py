"""The target's login state machine (RFC 7143 6.3, 11.12, 11.13), sans-IO.

The session layer turns each Login Request into a `LoginStep` (`LoginStep.from_pdu`), feeds
it to `LoginNegotiator.step()` and sends back the `LoginReply` (`reply.to_pdu(...)`, adding
the sequence numbers it owns). A reply with `done` ends the login: on success it carries the
negotiated `SessionParams` and `ConnectionParams`, otherwise the connection is closed after
sending it (a redirect is such a "failure" with status 0x0101 and a TargetAddress).

Peer mistakes never raise: they become a failure reply with the precise status. Calling
`step()` after `done` raises LocalProtocolError.

Stages advance through a table, not nested ifs:

    state            request CSG   T  NSG   next state
    INITIAL          0             *  *     SECURITY   (then as below)
    INITIAL          1             *  *     OPERATIONAL
    SECURITY         0             0  -     SECURITY
    SECURITY         0             1  1     OPERATIONAL   (once authenticated)
    SECURITY         0             1  3     FULL_FEATURE  (once authenticated)
    OPERATIONAL      1             0  -     OPERATIONAL
    OPERATIONAL      1             1  3     FULL_FEATURE

Any other (state, CSG, T, NSG) is an initiator error (0x0200). In the security stage the
authentication sub-machine runs: AuthMethod -> CHAP_A -> CHAP_N/CHAP_R (see `chap`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

from lunastor.iscsi.chap import ChapAuthenticator, ChapCredentials
from lunastor.iscsi.errors import LocalProtocolError, LoginStatus, RemoteProtocolError
from lunastor.iscsi.params import (
    SECURITY_KEYS,
    ConnectionParams,
    ParamNegotiator,
    SessionParams,
    TargetSettings,
    Use,
    login_failure,
)
from lunastor.iscsi.pdu import LoginRequest, LoginResponse, Stage
from lunastor.iscsi.text import encode_text, parse_text

ISCSI_VERSION = 0x00
LOGIN_MAX_SEGMENT = 8192  # MaxRecvDataSegmentLength in force during login (RFC 7143 13.12)
MAX_LOGIN_TEXT = 64 * 1024  # cap on reassembled C-bit text, against memory abuse


@dataclass(frozen=True, slots=True)
class TargetDecision:
    """The policy's verdict on a login to a target (or to the discovery service)."""

    status: LoginStatus = LoginStatus.SUCCESS
    chap: ChapCredentials | None = None  # None: no authentication required
    alias: str | None = None
    target_address: str | None = None  # "host:port,tpgt" for TARGET_MOVED_* redirects

    @classmethod
    def redirect(cls, target_address: str, *, permanent: bool = False) -> TargetDecision:
        status = (
            LoginStatus.TARGET_MOVED_PERMANENTLY
            if permanent
            else LoginStatus.TARGET_MOVED_TEMPORARILY
        )
        return cls(status=status, target_address=target_address)


class LoginPolicy(Protocol):
    """The target's decisions, supplied by the chunk server or the redirector."""

    def authorize(self, initiator_name: str, target_name: str) -> TargetDecision:
        """May this initiator log in to this target? NOT_FOUND, TARGET_REMOVED,
        AUTHORIZATION_FAILURE, a redirect, SERVICE_UNAVAILABLE... or SUCCESS with CHAP
        credentials and alias."""
        ...

    def authorize_discovery(self, initiator_name: str) -> TargetDecision:
        """A discovery session, with the separate discovery CHAP credentials if any."""
        ...

    def allocate_tsih(self, isid: int, initiator_name: str, target_name: str | None) -> int | None:
        """A fresh non-zero TSIH for a new session, or None when out of resources."""
        ...

    def join_session(self, isid: int, tsih: int, cid: int, initiator_name: str) -> LoginStatus:
        """A login with a non-zero TSIH: SUCCESS to reinstate/add the connection, else
        e.g. SESSION_DOES_NOT_EXIST or TOO_MANY_CONNECTIONS."""
        ...


class LoginState(Enum):
    INITIAL = auto()
    SECURITY = auto()
    OPERATIONAL = auto()
    FULL_FEATURE = auto()
    FAILED = auto()


class AuthPhase(Enum):
    AWAIT_METHOD = auto()
    AWAIT_ALGORITHM = auto()  # CHAP agreed, waiting for CHAP_A
    AWAIT_RESPONSE = auto()  # challenge sent, waiting for CHAP_N/CHAP_R
    DONE = auto()


# (state, request CSG) -> state the request is processed in
STAGE_OF_REQUEST: dict[tuple[LoginState, int], LoginState] = {
    (LoginState.INITIAL, Stage.SECURITY_NEGOTIATION): LoginState.SECURITY,
    (LoginState.INITIAL, Stage.LOGIN_OPERATIONAL_NEGOTIATION): LoginState.OPERATIONAL,
    (LoginState.SECURITY, Stage.SECURITY_NEGOTIATION): LoginState.SECURITY,
    (LoginState.OPERATIONAL, Stage.LOGIN_OPERATIONAL_NEGOTIATION): LoginState.OPERATIONAL,
}
# (state, requested NSG) -> state after a granted transit
TRANSIT: dict[tuple[LoginState, int], LoginState] = {
    (LoginState.SECURITY, Stage.LOGIN_OPERATIONAL_NEGOTIATION): LoginState.OPERATIONAL,
    (LoginState.SECURITY, Stage.FULL_FEATURE_PHASE): LoginState.FULL_FEATURE,
    (LoginState.OPERATIONAL, Stage.FULL_FEATURE_PHASE): LoginState.FULL_FEATURE,
}
IDENTITY_KEYS = frozenset({"InitiatorName", "TargetName", "SessionType"})


@dataclass(frozen=True, slots=True)
class LoginStep:
    """The fields of one Login Request the negotiator needs."""

    transit: bool
    cont: bool
    csg: int
    nsg: int
    isid: int
    tsih: int
    cid: int
    itt: int
    cmdsn: int = 0
    expstatsn: int = 0
    version_max: int = ISCSI_VERSION
    version_min: int = ISCSI_VERSION
    data: bytes = b""

    @classmethod
    def from_pdu(cls, pdu: LoginRequest) -> LoginStep:
        return cls(
            transit=pdu.transit,
            cont=pdu.cont,
            csg=pdu.csg,
            nsg=pdu.nsg,
            isid=pdu.isid,
            tsih=pdu.tsih,
            cid=pdu.cid,
            itt=pdu.itt,
            cmdsn=pdu.cmdsn,
            expstatsn=pdu.expstatsn,
            version_max=pdu.version_max,
            version_min=pdu.version_min,
            data=bytes(pdu.data),
        )


@dataclass(frozen=True, slots=True)
class LoginReply:
    """One Login Response. `keys` are the pairs `data` carries (a chunk of them when `cont`)."""

    transit: bool
    cont: bool
    csg: int
    nsg: int
    status: LoginStatus
    isid: int
    tsih: int
    itt: int
    data: bytes = b""
    keys: tuple[tuple[str, str], ...] = ()
    done: bool = False
    session: SessionParams | None = None
    connection: ConnectionParams | None = None
    message: str = ""  # why a login failed, for logs
    warnings: tuple[str, ...] = ()

    @property
    def status_class(self) -> int:
        return self.status.status_class

    @property
    def status_detail(self) -> int:
        return self.status.status_detail

    def to_pdu(self, *, statsn: int, expcmdsn: int, maxcmdsn: int) -> LoginResponse:
        return LoginResponse(
            transit=self.transit,
            cont=self.cont,
            csg=self.csg,
            nsg=self.nsg,
            version_max=ISCSI_VERSION,
            version_active=ISCSI_VERSION,
            isid=self.isid,
            tsih=self.tsih,
            itt=self.itt,
            statsn=statsn,
            expcmdsn=expcmdsn,
            maxcmdsn=maxcmdsn,
            status_class=self.status_class,
            status_detail=self.status_detail,
            data=self.data,
        )


@dataclass
class _Pending:
    """Our response text still to send in C-bit chunks, and the transit it ends with."""

    text: bytes
    transit: bool
    csg: int
    nsg: int
    next_state: LoginState
    keys: tuple[tuple[str, str], ...]


class LoginNegotiator:
    """One connection's login, from the first Login Request to Full Feature Phase."""

    def __init__(
        self,
        policy: LoginPolicy,
        settings: TargetSettings | None = None,
        *,
        random_bytes: Callable[[int], bytes] | None = None,
    ) -> None:
        self.policy = policy
        self.settings = settings or TargetSettings()
        self.state = LoginState.INITIAL
        self.auth = AuthPhase.AWAIT_METHOD
        self._random = random_bytes
        self._chap: ChapAuthenticator | None = None
        self._decision: TargetDecision | None = None
        self._params = ParamNegotiator(self.settings)
        self._inbox = b""
        self._inbox_csg = 0
        self._pending: _Pending | None = None
        self._started = False  # a first request (maybe a C-bit part) was seen
        self._first = True  # the first complete key list is still to come
        self._first_response_sent = False
        self._declared_operational = False
        self.isid = 0
        self.tsih = 0
        self.cid = 0
        self.initiator_name = ""
        self.target_name: str | None = None
        self.session_type = "Normal"
        self.warnings: list[str] = []
        self.session: SessionParams | None = None
        self.connection: ConnectionParams | None = None

    @property
    def done(self) -> bool:
        return self.state in (LoginState.FULL_FEATURE, LoginState.FAILED)

    # -- entry point -----------------------------------------------------------------------

    def step(self, step: LoginStep) -> LoginReply:
        if self.done:
            raise LocalProtocolError("login already finished")
        try:
            return self._step(step)
        except RemoteProtocolError as exc:
            return self._fail(step, exc.login_status, str(exc))

    def _fail(
        self,
        step: LoginStep,
        status: LoginStatus,
        message: str,
        keys: tuple[tuple[str, str], ...] = (),
    ) -> LoginReply:
        self.state = LoginState.FAILED
        if status == LoginStatus.SUCCESS:  # defensive: a failure must not read as success
            status = LoginStatus.TARGET_ERROR
        return LoginReply(
            transit=False,
            cont=False,
            csg=step.csg if step.csg in (0, 1, 3) else 0,
            nsg=0,
            status=status,
            isid=step.isid,
            tsih=step.tsih,
            itt=step.itt,
            data=encode_text(keys),
            keys=keys,
            done=True,
            message=message,
            warnings=tuple(self.warnings),
        )

    def _step(self, step: LoginStep) -> LoginReply:
        self._check_header(step)
        if self._pending is not None:
            return self._continue_pending(step)
        stage = STAGE_OF_REQUEST.get((self.state, step.csg))
        if stage is None:
            raise login_failure(f"login request for stage {step.csg} in state {self.state.name}")
        if step.transit and (stage, step.nsg) not in TRANSIT:
            raise login_failure(f"cannot transit from stage {step.csg} to {step.nsg}")
        if len(self._inbox) + len(step.data) > MAX_LOGIN_TEXT:
            raise login_failure("login text too long")
        if self._inbox and step.csg != self._inbox_csg:
            raise login_failure("stage changed in the middle of a continued key list")
        self._inbox += step.data
        self._inbox_csg = step.csg
        if step.cont:
            # part of a longer key list: acknowledge with an empty response (RFC 7143 6.3)
            return self._reply(step, False, step.csg, step.nsg, ())
        text, self._inbox = self._inbox, b""
        pairs = parse_text(text)
        if self._first:
            redirect = self._first_request(step, pairs, stage)
            if redirect is not None:
                return redirect
        self.state = stage
        answers = self._negotiate(pairs, stage)
        return self._conclude(step, stage, answers)

    def _check_header(self, step: LoginStep) -> None:
        if step.cont and step.transit:
            raise login_failure("C and T bits both set")
        if not self._started:
            if step.version_min > ISCSI_VERSION:
                raise login_failure(
                    f"version {step.version_min}-{step.version_max} unsupported",
                    LoginStatus.UNSUPPORTED_VERSION,
                )
            self._started = True
            self.isid, self.tsih, self.cid = step.isid, step.tsih, step.cid
        elif (step.isid, step.tsih, step.cid) != (self.isid, self.tsih, self.cid):
            raise login_failure("ISID, TSIH or CID changed during login")

    # -- first request: who is logging in to what --------------------------------------------

    def _first_request(
        self, step: LoginStep, pairs: list[tuple[str, str]], stage: LoginState
    ) -> LoginReply | None:
        self._first = False
        found = {k: v for k, v in pairs if k in IDENTITY_KEYS}
        name = found.get("InitiatorName")
        if not name:
            raise login_failure("InitiatorName missing", LoginStatus.MISSING_PARAMETER)
        if len(name.encode()) > 223:
            raise login_failure("InitiatorName longer than 223 bytes")
        self.initiator_name = name
        self.session_type = found.get("SessionType", "Normal")
        if self.session_type not in ("Normal", "Discovery"):
            raise login_failure(
                f"SessionType={self.session_type[:40]!r}", LoginStatus.SESSION_TYPE_NOT_SUPPORTED
            )
        if self.session_type == "Normal":
            target = found.get("TargetName")
            if not target:
                raise login_failure("TargetName missing", LoginStatus.MISSING_PARAMETER)
            self.target_name = target
            decision = self.policy.authorize(name, target)
        else:
            decision = self.policy.authorize_discovery(name)
        if decision.status in (
            LoginStatus.TARGET_MOVED_TEMPORARILY,
            LoginStatus.TARGET_MOVED_PERMANENTLY,
        ):
            if not decision.target_address:
                raise LocalProtocolError("a redirect needs a target address")
            keys = (("TargetAddress", decision.target_address),)
            return self._fail(step, decision.status, "redirected", keys)
        if decision.status != LoginStatus.SUCCESS:
            raise login_failure(f"policy refused: {decision.status.name}", decision.status)
        self._decision = decision
        if step.tsih != 0:
            status = self.policy.join_session(step.isid, step.tsih, step.cid, name)
            if status != LoginStatus.SUCCESS:
                raise login_failure(f"joining session {step.tsih}: {status.name}", status)
            self._params.leading = False
        if decision.chap is not None:
            self._chap = ChapAuthenticator(
                decision.chap, **({"random_bytes": self._random} if self._random else {})
            )
            self.warnings.extend(self._chap.warnings)
            if stage is LoginState.OPERATIONAL:
                raise login_failure(
                    "authentication required, security stage skipped",
                    LoginStatus.AUTHENTICATION_FAILURE,
                )
        return None

    # -- keys --------------------------------------------------------------------------------

    def _negotiate(self, pairs: list[tuple[str, str]], stage: LoginState) -> list[tuple[str, str]]:
        answers: list[tuple[str, str]] = []
        security: dict[str, str] = {}
        use = Use.SECURITY if stage is LoginState.SECURITY else Use.OPERATIONAL
        seen_here: set[str] = set()
        for key, value in pairs:
            if key in seen_here:
                raise login_failure(f"{key} sent twice")
            seen_here.add(key)
            if key in IDENTITY_KEYS:
                if self._identity_value(key) not in (None, value):
                    raise login_failure(f"{key} changed during login")
                continue
            if key in SECURITY_KEYS:
                if stage is not LoginState.SECURITY:
                    raise login_failure(f"{key} outside the security stage")
                security[key] = value
                continue
            if key == "SendTargets":
                answers.append((key, "Irrelevant"))
                continue
            answer = self._params.answer(key, value, use)
            if answer is not None:
                answers.append((key, answer))
        if security:
            answers.extend(self._authenticate(security))
        return answers

    def _identity_value(self, key: str) -> str | None:
        if key == "InitiatorName":
            return self.initiator_name
        if key == "TargetName":
            return self.target_name
        return self.session_type

    def _authenticate(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        # each handler consumes the keys of its phase (or raises), so one request may carry
        # several phases, e.g. AuthMethod and CHAP_A together
        answers: list[tuple[str, str]] = []
        while keys:
            answers += AUTH_STEPS[self.auth](self, keys)
        return answers

    def _auth_method(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        offered = keys.pop("AuthMethod", None)
        if offered is None:
            raise login_failure(f"expected AuthMethod, got {sorted(keys)}")
        acceptable = "CHAP" if self._chap is not None else "None"
        if acceptable not in offered.split(","):
            raise login_failure(
                f"AuthMethod={offered[:40]!r} does not include {acceptable}",
                LoginStatus.AUTHENTICATION_FAILURE,
            )
        self.auth = AuthPhase.AWAIT_ALGORITHM if self._chap is not None else AuthPhase.DONE
        return [("AuthMethod", acceptable)]

    def _chap_algorithm(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        offered = keys.pop("CHAP_A", None)
        if offered is None:
            raise login_failure(f"expected CHAP_A, got {sorted(keys)}")
        assert self._chap is not None
        answer = self._chap.challenge(offered)
        self.auth = AuthPhase.AWAIT_RESPONSE
        return answer

    def _chap_response(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        if set(keys) - {"CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"}:
            raise login_failure(f"unexpected security keys {sorted(keys)}")
        assert self._chap is not None
        answer = self._chap.verify(keys)
        keys.clear()
        self.auth = AuthPhase.DONE
        return answer

    def _auth_done(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        raise login_failure(f"security keys after authentication: {sorted(keys)}")

    # -- the response ------------------------------------------------------------------------

    def _authenticated(self) -> bool:
        return self.auth is AuthPhase.DONE or (
            self._chap is None and self.auth is AuthPhase.AWAIT_METHOD
        )

    def _conclude(
        self, step: LoginStep, stage: LoginState, answers: list[tuple[str, str]]
    ) -> LoginReply:
        keys = list(answers)
        if not self._first_response_sent:
            self._first_response_sent = True
            keys.extend(self._first_declarations())
        transit = False
        next_state = stage
        if step.transit:
            if stage is LoginState.SECURITY and not self._authenticated():
                if self.auth is AuthPhase.AWAIT_METHOD:
                    raise login_failure(
                        "leaving the security stage unauthenticated",
                        LoginStatus.AUTHENTICATION_FAILURE,
                    )
                # CHAP still running: answer T=0 and stay in the stage
            else:
                transit = True
                next_state = TRANSIT[(stage, step.nsg)]
        if not self._declared_operational and (
            stage is LoginState.OPERATIONAL or next_state is LoginState.FULL_FEATURE
        ):
            self._declared_operational = True
            keys.append(
                ("MaxRecvDataSegmentLength", str(self.settings.max_recv_data_segment_length))
            )
        if next_state is LoginState.FULL_FEATURE:
            self._finish()
        return self._send(step, transit, step.csg, step.nsg, tuple(keys), next_state)

    def _first_declarations(self) -> list[tuple[str, str]]:
        if self.session_type != "Normal":
            return []
        keys = [("TargetPortalGroupTag", str(self.settings.target_portal_group_tag))]
        if self._decision is not None and self._decision.alias:
            keys.append(("TargetAlias", self._decision.alias))
        return keys

    def _finish(self) -> None:
        tsih = self.tsih  # joining an existing session keeps its TSIH
        if tsih == 0:
            allocated = self.policy.allocate_tsih(self.isid, self.initiator_name, self.target_name)
            if allocated is None:
                raise login_failure("no TSIH available", LoginStatus.OUT_OF_RESOURCES)
            if not 1 <= allocated <= 0xFFFF:
                raise LocalProtocolError(f"policy returned TSIH {allocated}")
            tsih = allocated
        self.session = self._params.session_params(
            session_type=self.session_type,
            initiator_name=self.initiator_name,
            target_name=self.target_name,
            target_alias=self._decision.alias if self._decision else None,
            isid=self.isid,
            tsih=tsih,
        )
        self.connection = self._params.connection_params(cid=self.cid)

    def _send(
        self,
        step: LoginStep,
        transit: bool,
        csg: int,
        nsg: int,
        keys: tuple[tuple[str, str], ...],
        next_state: LoginState,
    ) -> LoginReply:
        text = encode_text(keys)
        if len(text) > LOGIN_MAX_SEGMENT:
            # the initiator fetches the rest with empty requests; the last chunk transits
            self._pending = _Pending(text, transit, csg, nsg, next_state, keys)
            return self._reply(step, False, csg, nsg, keys, text[:LOGIN_MAX_SEGMENT], cont=True)
        self.state = next_state
        return self._reply(step, transit, csg, nsg, keys, text)

    def _continue_pending(self, step: LoginStep) -> LoginReply:
        pending = self._pending
        assert pending is not None
        if step.data or step.cont or step.csg != pending.csg:
            raise login_failure("keys sent while the target's response was being continued")
        pending.text = pending.text[LOGIN_MAX_SEGMENT:]
        if len(pending.text) > LOGIN_MAX_SEGMENT:
            chunk = pending.text[:LOGIN_MAX_SEGMENT]
            return self._reply(
                step, False, pending.csg, pending.nsg, pending.keys, chunk, cont=True
            )
        self._pending = None
        self.state = pending.next_state
        return self._reply(
            step, pending.transit, pending.csg, pending.nsg, pending.keys, pending.text
        )

    def _reply(
        self,
        step: LoginStep,
        transit: bool,
        csg: int,
        nsg: int,
        keys: tuple[tuple[str, str], ...],
        data: bytes = b"",
        *,
        cont: bool = False,
    ) -> LoginReply:
        done = self.state is LoginState.FULL_FEATURE
        return LoginReply(
            transit=transit,
            cont=cont,
            csg=csg,
            nsg=nsg if transit else csg,
            status=LoginStatus.SUCCESS,
            isid=step.isid,
            tsih=self.session.tsih if done and self.session else step.tsih,
            itt=step.itt,
            data=data,
            keys=keys,
            done=done,
            session=self.session if done else None,
            connection=self.connection if done else None,
            warnings=tuple(self.warnings),
        )


# security sub-machine: which handler takes the security keys in each phase
AUTH_STEPS: dict[AuthPhase, Callable[[LoginNegotiator, dict[str, str]], list[tuple[str, str]]]] = {
    AuthPhase.AWAIT_METHOD: LoginNegotiator._auth_method,
    AuthPhase.AWAIT_ALGORITHM: LoginNegotiator._chap_algorithm,
    AuthPhase.AWAIT_RESPONSE: LoginNegotiator._chap_response,
    AuthPhase.DONE: LoginNegotiator._auth_done,
}
