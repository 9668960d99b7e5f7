"""Text segments: key=value pairs with NUL terminators (RFC 7143 6.1)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lunastor.iscsi.errors import LocalProtocolError, LoginStatus, RemoteProtocolError
from lunastor.iscsi.text import encode_text, parse_text

CASES = [
    (b"", []),
    (b"A=B\0", [("A", "B")]),
    (
        b"InitiatorName=iqn.2004-10.com.ubuntu:01:abc\0SessionType=Normal\0AuthMethod=CHAP,None\0",
        [
            ("InitiatorName", "iqn.2004-10.com.ubuntu:01:abc"),
            ("SessionType", "Normal"),
            ("AuthMethod", "CHAP,None"),
        ],
    ),
    (b"X-com.example.key=\0", [("X-com.example.key", "")]),
    (b"K=a=b\0", [("K", "a=b")]),
    (b"TargetAlias=caf\xc3\xa9\0", [("TargetAlias", "café")]),
]


@pytest.mark.parametrize(("wire", "pairs"), CASES)
def test_text_both_directions(wire: bytes, pairs: list[tuple[str, str]]) -> None:
    assert parse_text(memoryview(wire)) == pairs
    assert encode_text(pairs) == wire


@pytest.mark.parametrize(
    ("wire", "pairs"),
    [(b"A=B", [("A", "B")]), (b"A=B\0\0C=D\0\0\0", [("A", "B"), ("C", "D")])],
)
def test_tolerated_deviations(wire: bytes, pairs: list[tuple[str, str]]) -> None:
    assert parse_text(wire) == pairs


@pytest.mark.parametrize(
    "wire",
    [
        b"NoEquals\0",
        b"=value\0",
        b"bad key=1\0",
        b"K" * 64 + b"=1\0",
        b"K=" + b"v" * 8193 + b"\0",
        b"K=\xff\xfe\0",
        b"K\xc3\xa9=1\0",
    ],
)
def test_malformed_text(wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_text(wire)
    assert info.value.login_status == LoginStatus.INITIATOR_ERROR


def test_limits_are_inclusive() -> None:
    assert parse_text(b"K" * 63 + b"=" + b"v" * 8192 + b"\0") == [("K" * 63, "v" * 8192)]


@pytest.mark.parametrize(
    "pair", [("", "x"), ("a b", "x"), ("K" * 64, "x"), ("K", "a\0b"), ("K", "v" * 8193)]
)
def test_encode_refuses_what_cannot_be_sent(pair: tuple[str, str]) -> None:
    with pytest.raises(LocalProtocolError):
        encode_text([pair])


KEYS = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-+@_",
    min_size=1,
    max_size=63,
)
VALUES = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=50)


@given(st.lists(st.tuples(KEYS, VALUES), max_size=10))
def test_text_round_trip(pairs: list[tuple[str, str]]) -> None:
    assert parse_text(encode_text(pairs)) == pairs


@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_ours(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        parse_text(data)
