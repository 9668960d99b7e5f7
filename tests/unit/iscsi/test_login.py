"""Login conversations as open-iscsi and libiscsi hold them, and every failure status."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from lunastor.iscsi.errors import LocalProtocolError, LoginStatus
from lunastor.iscsi.login import LoginState, LoginStep, TargetDecision
from lunastor.iscsi.pdu import LoginResponse, decode_pdu, encode_pdu
from tests.unit.iscsi.login_support import (
    INITIATOR,
    ISID,
    TARGET,
    Policy,
    chap,
    keys_of,
    negotiator,
    step,
)

SEC, OP, FFP = 0, 1, 3

OPEN_ISCSI_SECURITY = [
    ("InitiatorName", INITIATOR),
    ("InitiatorAlias", "node1"),
    ("TargetName", TARGET),
    ("SessionType", "Normal"),
    ("AuthMethod", "None"),
]
OPEN_ISCSI_OPERATIONAL = [
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"),
    ("IFMarker", "No"),
    ("OFMarker", "No"),
    ("ErrorRecoveryLevel", "0"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "16776192"),
    ("FirstBurstLength", "262144"),
    ("MaxOutstandingR2T", "1"),
    ("MaxConnections", "1"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
    ("MaxRecvDataSegmentLength", "262144"),
]
LIBISCSI_OPERATIONAL = [
    ("InitiatorName", INITIATOR),
    ("TargetName", TARGET),
    ("SessionType", "Normal"),
    ("HeaderDigest", "None,CRC32C"),
    ("DataDigest", "None"),
    ("InitialR2T", "Yes"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "262144"),
    ("FirstBurstLength", "262144"),
    ("MaxRecvDataSegmentLength", "262144"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
]


def test_open_iscsi_without_authentication() -> None:
    neg = negotiator()
    first = neg.step(step(SEC, OP, OPEN_ISCSI_SECURITY))
    assert (first.status, first.transit, first.csg, first.nsg) == (LoginStatus.SUCCESS, True, 0, 1)
    assert keys_of(first) == {
        "AuthMethod": "None",
        "TargetPortalGroupTag": "1",
        "TargetAlias": "vol1",
    }
    assert not first.done and first.tsih == 0
    final = neg.step(step(OP, FFP, OPEN_ISCSI_OPERATIONAL))
    assert (final.transit, final.csg, final.nsg, final.done) == (True, 1, 3, True)
    assert keys_of(final) == {
        "HeaderDigest": "None",
        "DataDigest": "None",
        "DefaultTime2Wait": "2",
        "DefaultTime2Retain": "0",
        "IFMarker": "No",
        "OFMarker": "No",
        "ErrorRecoveryLevel": "0",
        "InitialR2T": "No",
        "ImmediateData": "Yes",
        "MaxBurstLength": "1048576",
        "FirstBurstLength": "262144",
        "MaxOutstandingR2T": "1",
        "MaxConnections": "1",
        "DataPDUInOrder": "Yes",
        "DataSequenceInOrder": "Yes",
        "MaxRecvDataSegmentLength": "262144",
    }
    assert final.tsih == 7
    session, conn = final.session, final.connection
    assert session is not None and conn is not None
    assert (session.initiator_name, session.target_name, session.tsih) == (INITIATOR, TARGET, 7)
    assert (session.initiator_alias, session.target_alias) == ("node1", "vol1")
    assert session.max_burst_length == 1048576 and session.first_burst_length == 262144
    assert not session.initial_r2t and session.immediate_data
    assert session.default_time2retain == 0 and session.error_recovery_level == 0
    assert not session.discovery
    assert (conn.header_digest, conn.data_digest) == (False, False)
    assert conn.max_send_data_segment_length == 262144
    assert conn.max_recv_data_segment_length == 262144
    assert neg.state is LoginState.FULL_FEATURE


def test_libiscsi_straight_to_operational_with_digest_list() -> None:
    neg = negotiator()
    reply = neg.step(step(OP, FFP, LIBISCSI_OPERATIONAL))
    assert reply.done and reply.status == LoginStatus.SUCCESS
    got = keys_of(reply)
    assert got["HeaderDigest"] == "None"  # first acceptable in the initiator's order
    assert got["InitialR2T"] == "Yes"  # OR
    assert got["TargetPortalGroupTag"] == "1"
    assert reply.session is not None and reply.session.initial_r2t


def test_digests_negotiated_on() -> None:
    neg = negotiator()
    keys = [*LIBISCSI_OPERATIONAL]
    keys[3] = ("HeaderDigest", "CRC32C,None")
    keys[4] = ("DataDigest", "CRC32C")
    reply = neg.step(step(OP, FFP, keys))
    assert reply.connection is not None
    assert (reply.connection.header_digest, reply.connection.data_digest) == (True, True)


def test_digest_not_acceptable_is_rejected() -> None:
    neg = negotiator(digests=("None",))
    keys = [*LIBISCSI_OPERATIONAL]
    keys[4] = ("DataDigest", "CRC32C")
    reply = neg.step(step(OP, FFP, keys))
    assert keys_of(reply)["DataDigest"] == "Reject"
    assert reply.connection is not None and not reply.connection.data_digest


def _chap_login(neg_policy: Policy, secret: bytes, mutual_challenge: bytes | None = None):  # type: ignore[no-untyped-def]
    neg = negotiator(neg_policy)
    r1 = neg.step(step(SEC, OP, [*OPEN_ISCSI_SECURITY[:4], ("AuthMethod", "CHAP,None")]))
    assert keys_of(r1)["AuthMethod"] == "CHAP"
    assert not r1.transit  # CHAP still to run: the target holds the stage
    r2 = neg.step(step(SEC, OP, [("CHAP_A", "5")]))
    k2 = keys_of(r2)
    assert k2["CHAP_A"] == "5" and not r2.transit
    identifier = int(k2["CHAP_I"])
    challenge = bytes.fromhex(k2["CHAP_C"][2:])
    response = hashlib.md5(bytes([identifier]) + secret + challenge).hexdigest()
    keys = [("CHAP_N", "alice"), ("CHAP_R", "0x" + response)]
    if mutual_challenge is not None:
        keys += [("CHAP_I", "77"), ("CHAP_C", "0x" + mutual_challenge.hex())]
    r3 = neg.step(step(SEC, OP, keys))
    return neg, r3, challenge


def test_chap_one_way() -> None:
    policy = Policy(targets={TARGET: TargetDecision(chap=chap())})
    neg, r3, challenge = _chap_login(policy, b"initiator-secret-16")
    assert r3.status == LoginStatus.SUCCESS and r3.transit and keys_of(r3) == {}
    assert len(challenge) == 16
    final = neg.step(step(OP, FFP, OPEN_ISCSI_OPERATIONAL))
    assert final.done and final.status == LoginStatus.SUCCESS


def test_chap_wrong_secret() -> None:
    policy = Policy(targets={TARGET: TargetDecision(chap=chap())})
    neg, r3, _ = _chap_login(policy, b"not-the-secret!!")
    assert r3.status == LoginStatus.AUTHENTICATION_FAILURE and r3.done
    assert (r3.status_class, r3.status_detail) == (2, 1)
    with pytest.raises(LocalProtocolError):
        neg.step(step(OP, FFP, OPEN_ISCSI_OPERATIONAL))


def test_mutual_chap() -> None:
    policy = Policy(targets={TARGET: TargetDecision(chap=chap(mutual=b"target-secret-16b"))})
    mutual_challenge = bytes(range(100, 116))
    _, r3, _ = _chap_login(policy, b"initiator-secret-16", mutual_challenge)
    assert r3.status == LoginStatus.SUCCESS and r3.transit
    got = keys_of(r3)
    assert got["CHAP_N"] == "lunastor"
    expected = hashlib.md5(bytes([77]) + b"target-secret-16b" + mutual_challenge).hexdigest()
    assert got["CHAP_R"] == "0x" + expected


def test_mutual_chap_reflection_refused() -> None:
    policy = Policy(targets={TARGET: TargetDecision(chap=chap(mutual=b"target-secret-16b"))})
    neg = negotiator(policy)
    neg.step(step(SEC, OP, [*OPEN_ISCSI_SECURITY[:4], ("AuthMethod", "CHAP")]))
    k2 = keys_of(neg.step(step(SEC, OP, [("CHAP_A", "5")])))
    identifier, challenge = int(k2["CHAP_I"]), bytes.fromhex(k2["CHAP_C"][2:])
    response = hashlib.md5(bytes([identifier]) + b"initiator-secret-16" + challenge).hexdigest()
    r3 = neg.step(
        step(
            SEC,
            OP,
            [
                ("CHAP_N", "alice"),
                ("CHAP_R", "0x" + response),
                ("CHAP_I", str(identifier)),
                ("CHAP_C", k2["CHAP_C"]),  # our own challenge sent back
            ],
        )
    )
    assert r3.status == LoginStatus.AUTHENTICATION_FAILURE
    assert "reflected" in r3.message


def test_mutual_chap_requested_but_not_configured() -> None:
    policy = Policy(targets={TARGET: TargetDecision(chap=chap())})
    _, r3, _ = _chap_login(policy, b"initiator-secret-16", bytes(16))
    assert r3.status == LoginStatus.AUTHENTICATION_FAILURE


def test_chap_base64_response_accepted() -> None:
    import base64

    policy = Policy(targets={TARGET: TargetDecision(chap=chap())})
    neg = negotiator(policy)
    neg.step(step(SEC, OP, [*OPEN_ISCSI_SECURITY[:4], ("AuthMethod", "CHAP")]))
    k2 = keys_of(neg.step(step(SEC, OP, [("CHAP_A", "7,5")])))
    digest = hashlib.md5(
        bytes([int(k2["CHAP_I"])]) + b"initiator-secret-16" + bytes.fromhex(k2["CHAP_C"][2:])
    ).digest()
    r3 = neg.step(
        step(SEC, OP, [("CHAP_N", "alice"), ("CHAP_R", "0b" + base64.b64encode(digest).decode())])
    )
    assert r3.status == LoginStatus.SUCCESS


def test_short_chap_secret_is_accepted_but_reported() -> None:
    policy = Policy(targets={TARGET: TargetDecision(chap=chap(secret=b"short"))})
    _, r3, _ = _chap_login(policy, b"short")
    assert r3.status == LoginStatus.SUCCESS
    assert any("shorter than 12" in w for w in r3.warnings)


def test_discovery_uses_discovery_chap_not_target_chap() -> None:
    disc = chap(secret=b"discovery-secret")
    policy = Policy(
        targets={TARGET: TargetDecision(chap=chap())}, discovery=TargetDecision(chap=disc)
    )
    neg = negotiator(policy)
    r1 = neg.step(
        step(
            SEC,
            OP,
            [("InitiatorName", INITIATOR), ("SessionType", "Discovery"), ("AuthMethod", "CHAP")],
        )
    )
    assert keys_of(r1) == {"AuthMethod": "CHAP"}  # no TargetPortalGroupTag for discovery
    k2 = keys_of(neg.step(step(SEC, OP, [("CHAP_A", "5")])))
    response = hashlib.md5(
        bytes([int(k2["CHAP_I"])]) + b"discovery-secret" + bytes.fromhex(k2["CHAP_C"][2:])
    ).hexdigest()
    r3 = neg.step(step(SEC, OP, [("CHAP_N", "alice"), ("CHAP_R", "0x" + response)]))
    assert r3.status == LoginStatus.SUCCESS
    final = neg.step(step(OP, FFP, [("MaxRecvDataSegmentLength", "65536")]))
    assert final.session is not None and final.session.discovery
    assert final.session.target_name is None


def test_discovery_without_chap_straight_to_ffp() -> None:
    neg = negotiator()
    reply = neg.step(step(SEC, FFP, [("InitiatorName", INITIATOR), ("SessionType", "Discovery")]))
    assert reply.done and reply.status == LoginStatus.SUCCESS
    assert keys_of(reply) == {"MaxRecvDataSegmentLength": "262144"}


def test_keys_split_across_continuation_pdus() -> None:
    neg = negotiator()
    from lunastor.iscsi.text import encode_text

    text = encode_text(OPEN_ISCSI_SECURITY)
    cut = text.index(b"=iqn") + 7  # in the middle of a value
    r1 = neg.step(step(SEC, OP, text[:cut], transit=False, cont=True))
    assert (r1.status, r1.data, r1.transit, r1.done) == (LoginStatus.SUCCESS, b"", False, False)
    r2 = neg.step(step(SEC, OP, text[cut:]))
    assert keys_of(r2)["AuthMethod"] == "None" and r2.transit


def test_long_target_response_is_continued() -> None:
    neg = negotiator()
    private = [(f"X-com.example.k{i:04d}", "v") for i in range(600)]
    r1 = neg.step(step(OP, FFP, [*LIBISCSI_OPERATIONAL, *private]))
    assert r1.cont and not r1.transit and not r1.done and len(r1.data) == 8192
    chunks = [r1.data]
    while True:
        r = neg.step(step(OP, FFP, b""))
        chunks.append(r.data)
        if not r.cont:
            break
    assert r.transit and r.done and r.status == LoginStatus.SUCCESS
    answered = dict(__import__("lunastor.iscsi.text", fromlist=["x"]).parse_text(b"".join(chunks)))
    assert all(answered[k] == "NotUnderstood" for k, _ in private)


@pytest.mark.parametrize(
    ("key", "value", "answer"),
    [
        ("MaxBurstLength", "100", "Reject"),  # below 512
        ("ErrorRecoveryLevel", "2", "0"),  # min with ours
        ("ErrorRecoveryLevel", "3", "Reject"),
        ("InitialR2T", "Maybe", "Reject"),
        ("DefaultTime2Wait", "10", "10"),  # max with ours
        ("DefaultTime2Wait", "0", "0"),  # ours is 0: a reconnect after a failover need not wait
        ("MaxConnections", "4", "1"),
        ("MaxBurstLength", "0x1000", "4096"),
        ("X-com.example.thing", "1", "NotUnderstood"),
        ("X#org.example.thing", "1", "NotUnderstood"),
        ("iSCSIProtocolLevel", "2", "NotUnderstood"),
        ("IFMarker", "Yes", "No"),
        ("OFMarkInt", "2048~8192", "Reject"),
    ],
)
def test_key_answers(key: str, value: str, answer: str) -> None:
    reply = negotiator().step(step(OP, FFP, [*LIBISCSI_OPERATIONAL[:3], (key, value)]))
    assert reply.status == LoginStatus.SUCCESS
    assert keys_of(reply)[key] == answer


def test_first_burst_never_exceeds_max_burst() -> None:
    keys = [*LIBISCSI_OPERATIONAL[:3], ("MaxBurstLength", "4096"), ("FirstBurstLength", "65536")]
    session = negotiator().step(step(OP, FFP, keys)).session
    assert session is not None and session.first_burst_length == 4096


NORMAL = OPEN_ISCSI_SECURITY[:4]

# (name, policy, steps, expected status of the last reply)
FAILURES: list[tuple[str, Policy, list[LoginStep], LoginStatus]] = [
    (
        "target not found",
        Policy(targets={}),
        [step(SEC, OP, NORMAL)],
        LoginStatus.NOT_FOUND,
    ),
    (
        "target removed",
        Policy(targets={TARGET: TargetDecision(status=LoginStatus.TARGET_REMOVED)}),
        [step(SEC, OP, NORMAL)],
        LoginStatus.TARGET_REMOVED,
    ),
    (
        "initiator not allowed",
        Policy(allowed=set()),
        [step(SEC, OP, NORMAL)],
        LoginStatus.AUTHORIZATION_FAILURE,
    ),
    (
        "service unavailable",
        Policy(targets={TARGET: TargetDecision(status=LoginStatus.SERVICE_UNAVAILABLE)}),
        [step(SEC, OP, NORMAL)],
        LoginStatus.SERVICE_UNAVAILABLE,
    ),
    (
        "missing InitiatorName",
        Policy(),
        [step(SEC, OP, [("TargetName", TARGET)])],
        LoginStatus.MISSING_PARAMETER,
    ),
    (
        "missing TargetName",
        Policy(),
        [step(SEC, OP, [("InitiatorName", INITIATOR)])],
        LoginStatus.MISSING_PARAMETER,
    ),
    (
        "unsupported version",
        Policy(),
        [step(SEC, OP, NORMAL, version_min=1)],
        LoginStatus.UNSUPPORTED_VERSION,
    ),
    (
        "unknown session type",
        Policy(),
        [step(SEC, OP, [*NORMAL[:3], ("SessionType", "Bulk")])],
        LoginStatus.SESSION_TYPE_NOT_SUPPORTED,
    ),
    (
        "no TSIH left",
        Policy(tsih=None),
        [step(OP, FFP, NORMAL)],
        LoginStatus.OUT_OF_RESOURCES,
    ),
    (
        "session to join does not exist",
        Policy(),
        [step(OP, FFP, NORMAL, tsih=9)],
        LoginStatus.SESSION_DOES_NOT_EXIST,
    ),
    (
        "too many connections",
        Policy(existing={9: LoginStatus.TOO_MANY_CONNECTIONS}),
        [step(OP, FFP, NORMAL, tsih=9)],
        LoginStatus.TOO_MANY_CONNECTIONS,
    ),
    (
        "cannot include in session",
        Policy(existing={9: LoginStatus.CANT_INCLUDE_IN_SESSION}),
        [step(OP, FFP, NORMAL, tsih=9)],
        LoginStatus.CANT_INCLUDE_IN_SESSION,
    ),
    (
        "security stage skipped although CHAP is required",
        Policy(targets={TARGET: TargetDecision(chap=chap())}),
        [step(OP, FFP, NORMAL)],
        LoginStatus.AUTHENTICATION_FAILURE,
    ),
    (
        "leaving security without AuthMethod although CHAP is required",
        Policy(targets={TARGET: TargetDecision(chap=chap())}),
        [step(SEC, OP, NORMAL)],
        LoginStatus.AUTHENTICATION_FAILURE,
    ),
    (
        "AuthMethod=None only, CHAP required",
        Policy(targets={TARGET: TargetDecision(chap=chap())}),
        [step(SEC, OP, [*NORMAL, ("AuthMethod", "None")])],
        LoginStatus.AUTHENTICATION_FAILURE,
    ),
    (
        "no supported CHAP algorithm",
        Policy(targets={TARGET: TargetDecision(chap=chap())}),
        [step(SEC, OP, [*NORMAL, ("AuthMethod", "CHAP")]), step(SEC, OP, [("CHAP_A", "7")])],
        LoginStatus.AUTHENTICATION_FAILURE,
    ),
    (
        "CHAP response before CHAP_A",
        Policy(targets={TARGET: TargetDecision(chap=chap())}),
        [
            step(SEC, OP, [*NORMAL, ("AuthMethod", "CHAP")]),
            step(SEC, OP, [("CHAP_N", "alice"), ("CHAP_R", "0x00")]),
        ],
        LoginStatus.INITIATOR_ERROR,
    ),
    (
        "CHAP_R not binary",
        Policy(targets={TARGET: TargetDecision(chap=chap())}),
        [
            step(SEC, OP, [*NORMAL, ("AuthMethod", "CHAP")]),
            step(SEC, OP, [("CHAP_A", "5")]),
            step(SEC, OP, [("CHAP_N", "alice"), ("CHAP_R", "zz")]),
        ],
        LoginStatus.AUTHENTICATION_FAILURE,
    ),
    (
        "wrong CHAP name",
        Policy(targets={TARGET: TargetDecision(chap=chap())}),
        [
            step(SEC, OP, [*NORMAL, ("AuthMethod", "CHAP")]),
            step(SEC, OP, [("CHAP_A", "5")]),
            step(SEC, OP, [("CHAP_N", "mallory"), ("CHAP_R", "0x" + "00" * 16)]),
        ],
        LoginStatus.AUTHENTICATION_FAILURE,
    ),
    (
        "security key in the operational stage",
        Policy(),
        [step(OP, FFP, [*NORMAL, ("AuthMethod", "None")])],
        LoginStatus.INITIATOR_ERROR,
    ),
    (
        "transit backwards",
        Policy(),
        [step(OP, SEC, NORMAL)],
        LoginStatus.INITIATOR_ERROR,
    ),
    (
        "stage jumps back to security",
        Policy(),
        [step(OP, OP, NORMAL, transit=False), step(SEC, OP, [])],
        LoginStatus.INITIATOR_ERROR,
    ),
    (
        "C and T both set",
        Policy(),
        [step(SEC, OP, NORMAL, cont=True)],
        LoginStatus.INITIATOR_ERROR,
    ),
    (
        "malformed number",
        Policy(),
        [step(OP, FFP, [*NORMAL, ("MaxBurstLength", "lots")])],
        LoginStatus.INITIATOR_ERROR,
    ),
    (
        "malformed text",
        Policy(),
        [step(OP, FFP, b"InitiatorName\0")],
        LoginStatus.INITIATOR_ERROR,
    ),
    (
        "key negotiated twice",
        Policy(),
        [
            step(SEC, OP, [*NORMAL, ("MaxBurstLength", "4096")]),
            step(OP, FFP, [("MaxBurstLength", "8192")]),
        ],
        LoginStatus.INITIATOR_ERROR,
    ),
    (
        "InitiatorName changed",
        Policy(),
        [step(SEC, OP, NORMAL), step(OP, FFP, [("InitiatorName", "iqn.x")])],
        LoginStatus.INITIATOR_ERROR,
    ),
    (
        "ISID changed",
        Policy(),
        [step(SEC, OP, NORMAL), step(OP, FFP, [], isid=ISID + 1)],
        LoginStatus.INITIATOR_ERROR,
    ),
    (
        "target-only key from the initiator",
        Policy(),
        [step(OP, FFP, [*NORMAL, ("TargetPortalGroupTag", "1")])],
        LoginStatus.INITIATOR_ERROR,
    ),
    (
        "empty digest list item",
        Policy(),
        [step(OP, FFP, [*NORMAL, ("HeaderDigest", "CRC32C,,None")])],
        LoginStatus.INITIATOR_ERROR,
    ),
]


@pytest.mark.parametrize(
    ("name", "policy", "steps", "status"), FAILURES, ids=[f[0] for f in FAILURES]
)
def test_failure_status(
    name: str, policy: Policy, steps: list[LoginStep], status: LoginStatus
) -> None:
    neg = negotiator(policy)
    replies = [neg.step(s) for s in steps]
    last = replies[-1]
    assert all(r.status == LoginStatus.SUCCESS and not r.done for r in replies[:-1])
    assert (last.status, last.done, last.transit) == (status, True, False)
    assert neg.state is LoginState.FAILED and last.session is None
    with pytest.raises(LocalProtocolError):
        neg.step(steps[-1])


@pytest.mark.parametrize("permanent", [False, True])
def test_redirect(permanent: bool) -> None:
    policy = Policy(
        targets={TARGET: TargetDecision.redirect("10.0.0.7:3260,1", permanent=permanent)}
    )
    reply = negotiator(policy).step(step(SEC, OP, NORMAL))
    expected = (1, 2) if permanent else (1, 1)
    assert (reply.status_class, reply.status_detail) == expected
    assert keys_of(reply) == {"TargetAddress": "10.0.0.7:3260,1"}
    assert reply.done


def test_reply_to_pdu_round_trips_through_the_codec() -> None:
    neg = negotiator()
    reply = neg.step(step(OP, FFP, LIBISCSI_OPERATIONAL))
    pdu = reply.to_pdu(statsn=1, expcmdsn=2, maxcmdsn=3)
    wire = b"".join(encode_pdu(pdu))
    back = decode_pdu(wire[:48], b"", memoryview(wire[48 : 48 + len(reply.data)]))
    assert isinstance(back, LoginResponse)
    assert (back.transit, back.csg, back.nsg, back.tsih, back.isid) == (True, 1, 3, 7, ISID)
    assert bytes(back.data) == reply.data


def test_step_from_pdu() -> None:
    from lunastor.iscsi.pdu import LoginRequest

    pdu = LoginRequest(transit=True, csg=1, nsg=3, isid=ISID, cid=2, itt=5, data=b"A=B\0")
    assert LoginStep.from_pdu(pdu) == replace(step(OP, FFP, b"A=B\0", cid=2), itt=5, version_max=0)


def test_stage_change_inside_continued_key_list() -> None:
    neg = negotiator()
    neg.step(step(SEC, OP, b"InitiatorName=iq", transit=False, cont=True))
    reply = neg.step(step(OP, FFP, b"n.x\0"))
    assert reply.status == LoginStatus.INITIATOR_ERROR


def test_joining_an_existing_session_keeps_its_tsih() -> None:
    neg = negotiator(Policy(existing={9: LoginStatus.SUCCESS}))
    reply = neg.step(step(OP, FFP, [*NORMAL, ("MaxBurstLength", "4096")], tsih=9, cid=1))
    assert reply.done and reply.tsih == 9
    assert reply.session is not None and reply.session.max_burst_length == 262144  # LO: default
    assert keys_of(reply)["MaxBurstLength"] == "Irrelevant"
