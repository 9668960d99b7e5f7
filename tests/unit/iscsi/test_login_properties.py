"""Hypothesis: any sequence of login requests gets replies, never an exception of another kind.

The negotiator's only exception is LocalProtocolError, and only once the login is done; every
reply that ends the login is either Full Feature Phase with parameters, or a failure status.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lunastor.iscsi.errors import LocalProtocolError, LoginStatus
from lunastor.iscsi.login import LoginState, LoginStep, TargetDecision
from lunastor.iscsi.text import encode_text
from tests.unit.iscsi.login_support import (
    INITIATOR,
    ISID,
    TARGET,
    Policy,
    chap,
    negotiator,
    step,
)

KEY_POOL = [
    ("InitiatorName", INITIATOR),
    ("InitiatorName", "iqn.other"),
    ("TargetName", TARGET),
    ("TargetName", "iqn.missing"),
    ("SessionType", "Normal"),
    ("SessionType", "Discovery"),
    ("SessionType", "Weird"),
    ("AuthMethod", "CHAP,None"),
    ("AuthMethod", "None"),
    ("AuthMethod", "KRB5"),
    ("CHAP_A", "5"),
    ("CHAP_A", "6"),
    ("CHAP_N", "alice"),
    ("CHAP_R", "0x" + "11" * 16),
    ("CHAP_R", "0bAAAA"),
    ("CHAP_R", "nonsense"),
    ("CHAP_I", "3"),
    ("CHAP_I", "300"),
    ("CHAP_C", "0x0102"),
    ("HeaderDigest", "CRC32C,None"),
    ("DataDigest", "Bogus"),
    ("MaxBurstLength", "4096"),
    ("MaxBurstLength", "-1"),
    ("FirstBurstLength", "99999999999"),
    ("ErrorRecoveryLevel", "1"),
    ("MaxRecvDataSegmentLength", "0x2000"),
    ("TargetAlias", "x"),
    ("SendTargets", "All"),
    ("X-vendor", "1"),
    ("OFMarker", "Yes"),
]

RANDOM_STEPS = st.builds(
    LoginStep,
    transit=st.booleans(),
    cont=st.booleans(),
    csg=st.sampled_from([0, 1, 2, 3]),
    nsg=st.sampled_from([0, 1, 2, 3]),
    isid=st.sampled_from([ISID, ISID + 1]),
    tsih=st.sampled_from([0, 0, 0, 5]),
    cid=st.just(0),
    itt=st.integers(0, 3),
    version_max=st.just(0),
    version_min=st.sampled_from([0, 0, 0, 1]),
    data=st.one_of(
        st.lists(st.sampled_from(KEY_POOL), max_size=6).map(encode_text),
        st.binary(max_size=40),
    ),
)
NORMAL = [("InitiatorName", INITIATOR), ("TargetName", TARGET)]
# plausible steps, so that sequences also reach Full Feature Phase and CHAP's later phases
GOOD_STEPS = st.sampled_from(
    [
        step(0, 1, [*NORMAL, ("AuthMethod", "None")]),
        step(0, 1, [*NORMAL, ("AuthMethod", "CHAP,None")]),
        step(0, 1, [*NORMAL, ("AuthMethod", "CHAP"), ("CHAP_A", "5")]),
        step(0, 1, [("CHAP_A", "5")]),
        step(0, 1, [("CHAP_N", "alice"), ("CHAP_R", "0x" + "00" * 16)]),
        step(0, 3, [("InitiatorName", INITIATOR), ("SessionType", "Discovery")]),
        step(1, 3, [("MaxBurstLength", "4096"), ("HeaderDigest", "CRC32C")]),
        step(1, 3, [*NORMAL, ("ImmediateData", "No")]),
        step(1, 3, b"", transit=False),
        step(1, 3, b"Initiator", transit=False, cont=True),
        step(1, 3, b"Name=iqn.x\0TargetName=" + TARGET.encode() + b"\0"),
        step(1, 3, [*NORMAL], tsih=5),
    ]
)
STEPS = st.one_of(GOOD_STEPS, RANDOM_STEPS)
POLICIES = st.sampled_from(
    [
        Policy(),
        Policy(targets={TARGET: TargetDecision(chap=chap(mutual=b"target-secret-16b"))}),
        Policy(discovery=TargetDecision(chap=chap())),
        Policy(tsih=None, existing={5: LoginStatus.SUCCESS}),
        Policy(targets={TARGET: TargetDecision.redirect("10.1.1.1:3260,1")}),
    ]
)


@settings(max_examples=400)
@given(policy=POLICIES, steps=st.lists(STEPS, min_size=1, max_size=8))
def test_any_request_sequence_gets_a_reply(policy: Policy, steps: list[LoginStep]) -> None:
    neg = negotiator(policy)
    for s in steps:
        if neg.done:
            try:
                neg.step(s)
            except LocalProtocolError:
                continue
            raise AssertionError("step after the end of login must raise LocalProtocolError")
        reply = neg.step(s)
        assert reply.done == neg.done
        if reply.status != LoginStatus.SUCCESS:
            assert reply.done and neg.state is LoginState.FAILED and not reply.transit
        elif reply.done:
            assert neg.state is LoginState.FULL_FEATURE
            assert reply.session is not None and reply.connection is not None
            assert reply.transit and reply.nsg == 3 and reply.tsih != 0
        assert len(reply.data) <= 8192
