"""SendTargets answers and multi-PDU text exchanges."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lunastor.iscsi.errors import RemoteProtocolError
from lunastor.iscsi.pdu import RESERVED_TAG, TextRequest, TextResponse
from lunastor.iscsi.sendtargets import (
    TargetPortals,
    TextNegotiator,
    TextStep,
    portal_address,
    sendtargets_pairs,
)
from lunastor.iscsi.text import encode_text, parse_text

VOL1 = TargetPortals("iqn.2026-01.io.lunastor:vol1", ("10.0.0.1:3260,1", "10.0.0.2:3260,1"))
VOL2 = TargetPortals("iqn.2026-01.io.lunastor:vol2", ("10.0.0.3:3260,1",))
VISIBLE = [VOL1, VOL2]


@pytest.mark.parametrize(
    ("value", "discovery", "session_target", "expected"),
    [
        (
            "All",
            True,
            None,
            [
                ("TargetName", VOL1.name),
                ("TargetAddress", "10.0.0.1:3260,1"),
                ("TargetAddress", "10.0.0.2:3260,1"),
                ("TargetName", VOL2.name),
                ("TargetAddress", "10.0.0.3:3260,1"),
            ],
        ),
        (VOL2.name, True, None, [("TargetName", VOL2.name), ("TargetAddress", "10.0.0.3:3260,1")]),
        ("iqn.2026-01.io.lunastor:hidden", True, None, []),
        ("All", False, VOL1.name, [("SendTargets", "Reject")]),
        (
            "",
            False,
            VOL1.name,
            [
                ("TargetName", VOL1.name),
                ("TargetAddress", "10.0.0.1:3260,1"),
                ("TargetAddress", "10.0.0.2:3260,1"),
            ],
        ),
        ("", True, None, [("SendTargets", "Reject")]),
    ],
)
def test_sendtargets_answers(
    value: str, discovery: bool, session_target: str | None, expected: list[tuple[str, str]]
) -> None:
    got = sendtargets_pairs(value, VISIBLE, discovery=discovery, session_target=session_target)
    assert got == expected


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [("10.0.0.1", 3260, "10.0.0.1:3260,1"), ("fe80::1", 3261, "[fe80::1]:3261,1")],
)
def test_portal_address(host: str, port: int, expected: str) -> None:
    assert portal_address(host, port) == expected


def test_single_pdu_exchange_through_pdus() -> None:
    neg = TextNegotiator(lambda: VISIBLE, discovery=True)
    req = TextRequest(itt=3, data=encode_text([("SendTargets", "All")]))
    reply = neg.step(TextStep.from_pdu(req))
    assert (reply.final, reply.cont, reply.ttt, reply.done) == (True, False, RESERVED_TAG, True)
    pdu = reply.to_pdu(statsn=1, expcmdsn=2, maxcmdsn=3)
    assert isinstance(pdu, TextResponse) and pdu.itt == 3
    assert parse_text(pdu.data)[0] == ("TargetName", VOL1.name)


def test_long_answer_split_with_continue_bit_and_ttt() -> None:
    many = [
        TargetPortals(f"iqn.2026-01.io.lunastor:volume-{i:04d}", ("10.0.0.1:3260,1",))
        for i in range(400)
    ]
    neg = TextNegotiator(lambda: many, discovery=True, max_send_data_segment_length=4096)
    reply = neg.step(TextStep(final=True, cont=False, itt=9, ttt=RESERVED_TAG,
                              data=b"SendTargets=All\0"))  # fmt: skip
    chunks = [reply.data]
    tags = set()
    while not reply.final:
        assert reply.cont and reply.ttt != RESERVED_TAG and len(reply.data) == 4096
        tags.add(reply.ttt)
        reply = neg.step(TextStep(final=True, cont=False, itt=9, ttt=reply.ttt))
        chunks.append(reply.data)
    assert reply.ttt == RESERVED_TAG and not reply.cont
    assert len(chunks) > 3 and len(tags) == len(chunks) - 1
    pairs = parse_text(b"".join(chunks))
    assert [v for k, v in pairs if k == "TargetName"] == [t.name for t in many]


def test_request_continuation_is_reassembled() -> None:
    neg = TextNegotiator(lambda: VISIBLE, discovery=True)
    text = b"SendTargets=" + VOL2.name.encode() + b"\0"
    first = neg.step(TextStep(final=False, cont=True, itt=1, ttt=RESERVED_TAG, data=text[:15]))
    assert (first.final, first.data) == (False, b"") and first.ttt != RESERVED_TAG
    last = neg.step(TextStep(final=True, cont=False, itt=1, ttt=first.ttt, data=text[15:]))
    assert last.final and parse_text(last.data)[0] == ("TargetName", VOL2.name)


def test_other_keys_in_full_feature_phase() -> None:
    neg = TextNegotiator(lambda: VISIBLE, discovery=False, session_target=VOL1.name)
    keys = [("MaxRecvDataSegmentLength", "65536"), ("X-com.example", "1"), ("InitialR2T", "No")]
    reply = neg.step(TextStep(final=True, cont=False, itt=2, ttt=RESERVED_TAG,
                              data=encode_text(keys)))  # fmt: skip
    assert parse_text(reply.data) == [
        ("X-com.example", "NotUnderstood"),
        ("InitialR2T", "Irrelevant"),
    ]
    assert reply.max_send_data_segment_length == 65536
    assert neg.max_send_data_segment_length == 65536


def test_non_final_request_keeps_the_exchange_open() -> None:
    neg = TextNegotiator(lambda: VISIBLE, discovery=True)
    reply = neg.step(TextStep(final=False, cont=False, itt=4, ttt=RESERVED_TAG,
                              data=b"SendTargets=All\0"))  # fmt: skip
    assert not reply.final and reply.ttt != RESERVED_TAG and reply.data
    end = neg.step(TextStep(final=True, cont=False, itt=4, ttt=reply.ttt))
    assert end.final and end.data == b""


@pytest.mark.parametrize(
    "bad",
    [
        TextStep(final=True, cont=True, itt=1, ttt=RESERVED_TAG),
        TextStep(final=True, cont=False, itt=1, ttt=77),
        TextStep(final=True, cont=False, itt=1, ttt=RESERVED_TAG, data=b"NoEquals\0"),
        TextStep(final=True, cont=False, itt=1, ttt=RESERVED_TAG, data=b"TargetName=x\0"),
    ],
)
def test_bad_text_requests(bad: TextStep) -> None:
    with pytest.raises(RemoteProtocolError):
        TextNegotiator(lambda: VISIBLE, discovery=True).step(bad)


def test_wrong_ttt_while_continuing() -> None:
    many = [TargetPortals(f"iqn.x:{i:05d}", ("h:1,1",)) for i in range(1000)]
    neg = TextNegotiator(lambda: many, discovery=True, max_send_data_segment_length=512)
    first = neg.step(TextStep(final=True, cont=False, itt=1, ttt=RESERVED_TAG,
                              data=b"SendTargets=All\0"))  # fmt: skip
    with pytest.raises(RemoteProtocolError):
        neg.step(TextStep(final=True, cont=False, itt=1, ttt=first.ttt + 1))
    # a TTT of 0xffffffff resets: a fresh exchange starts
    again = neg.step(TextStep(final=True, cont=False, itt=1, ttt=RESERVED_TAG,
                              data=b"SendTargets=iqn.x:00001\0"))  # fmt: skip
    assert again.final and parse_text(again.data)[0] == ("TargetName", "iqn.x:00001")


TEXT_STEPS = st.builds(
    TextStep,
    final=st.booleans(),
    cont=st.booleans(),
    itt=st.integers(0, 2),
    ttt=st.sampled_from([RESERVED_TAG, 1, 2, 3, 4]),
    data=st.one_of(
        st.sampled_from(
            [b"", b"SendTargets=All\0", b"SendTargets=\0", b"SendTargets=iqn.x:00003\0", b"A=B"]
        ),
        st.binary(max_size=30),
    ),
)


@settings(max_examples=300)
@given(steps=st.lists(TEXT_STEPS, max_size=10), discovery=st.booleans())
def test_any_text_request_sequence(steps: list[TextStep], discovery: bool) -> None:
    many = [TargetPortals(f"iqn.x:{i:05d}", ("h:1,1",)) for i in range(40)]
    neg = TextNegotiator(lambda: many, discovery=discovery, max_send_data_segment_length=512)
    for s in steps:
        try:
            reply = neg.step(s)
        except RemoteProtocolError:
            continue
        assert len(reply.data) <= 512
        assert (reply.ttt == RESERVED_TAG) == reply.final
        assert not (reply.final and reply.cont)
