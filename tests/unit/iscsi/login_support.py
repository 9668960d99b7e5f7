"""A scripted initiator and a dictionary-backed policy for the login tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from lunastor.iscsi.chap import ChapCredentials
from lunastor.iscsi.errors import LoginStatus
from lunastor.iscsi.login import LoginNegotiator, LoginReply, LoginStep, TargetDecision
from lunastor.iscsi.params import TargetSettings
from lunastor.iscsi.text import encode_text, parse_text

INITIATOR = "iqn.2004-10.com.ubuntu:01:c0ffee"
TARGET = "iqn.2026-01.io.lunastor:vol1"
ISID = 0x023D00000001


@dataclass
class Policy:
    """Targets by name, with ACLs and CHAP; `decisions` overrides per target name."""

    targets: dict[str, TargetDecision] = field(
        default_factory=lambda: {TARGET: TargetDecision(alias="vol1")}
    )
    allowed: set[str] = field(default_factory=lambda: {INITIATOR})
    discovery: TargetDecision = field(default_factory=TargetDecision)
    tsih: int | None = 7
    existing: dict[int, LoginStatus] = field(default_factory=dict)

    def authorize(self, initiator_name: str, target_name: str) -> TargetDecision:
        decision = self.targets.get(target_name)
        if decision is None:
            return TargetDecision(status=LoginStatus.NOT_FOUND)
        if initiator_name not in self.allowed:
            return TargetDecision(status=LoginStatus.AUTHORIZATION_FAILURE)
        return decision

    def authorize_discovery(self, initiator_name: str) -> TargetDecision:
        return self.discovery

    def allocate_tsih(self, isid: int, initiator_name: str, target_name: str | None) -> int | None:
        return self.tsih

    def join_session(self, isid: int, tsih: int, cid: int, initiator_name: str) -> LoginStatus:
        return self.existing.get(tsih, LoginStatus.SESSION_DOES_NOT_EXIST)


def chap(secret: bytes = b"initiator-secret-16", mutual: bytes | None = None) -> ChapCredentials:
    return ChapCredentials(
        username="alice",
        secret=secret,
        mutual_username="lunastor" if mutual else None,
        mutual_secret=mutual,
    )


def step(
    csg: int,
    nsg: int,
    keys: list[tuple[str, str]] | bytes = (),  # type: ignore[assignment]
    *,
    transit: bool = True,
    cont: bool = False,
    isid: int = ISID,
    tsih: int = 0,
    cid: int = 0,
    version_min: int = 0,
) -> LoginStep:
    data = keys if isinstance(keys, bytes) else encode_text(keys)
    return LoginStep(
        transit=transit,
        cont=cont,
        csg=csg,
        nsg=nsg,
        isid=isid,
        tsih=tsih,
        cid=cid,
        itt=1,
        version_min=version_min,
        data=data,
    )


def keys_of(reply: LoginReply) -> dict[str, str]:
    return dict(parse_text(reply.data))


def negotiator(policy: Policy | None = None, **settings: object) -> LoginNegotiator:
    return LoginNegotiator(
        policy or Policy(),
        TargetSettings(**settings),  # type: ignore[arg-type]
        random_bytes=lambda n: bytes(range(1, n + 1)),
    )
