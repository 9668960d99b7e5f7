"""CHAP computed independently with hashlib, and the binary encodings."""

from __future__ import annotations

import base64
import hashlib

import pytest

from lunastor.iscsi.chap import (
    ChapAuthenticator,
    ChapCredentials,
    chap_response,
    decode_binary,
    encode_hex,
)
from lunastor.iscsi.errors import LoginStatus, RemoteProtocolError

CREDS = ChapCredentials("alice", b"0123456789abcdef", "tgt", b"fedcba9876543210")


def test_response_matches_rfc1994_definition() -> None:
    challenge = bytes(range(16))
    expected = hashlib.md5(b"\x2a" + b"0123456789abcdef" + challenge).digest()
    assert chap_response(42, b"0123456789abcdef", challenge) == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0x0a0B", b"\x0a\x0b"),
        ("0X1", b"\x01"),  # odd digit count: implied leading zero
        ("0b" + base64.b64encode(b"\x00\xffhi").decode(), b"\x00\xffhi"),
        ("0B" + base64.b64encode(b"x").decode(), b"x"),
    ],
)
def test_binary_encodings(text: str, value: bytes) -> None:
    assert decode_binary("CHAP_R", text) == value


@pytest.mark.parametrize("text", ["0x", "0b", "abcd", "0xzz", "0b!!!!", "12"])
def test_binary_encoding_errors(text: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_binary("CHAP_R", text)
    assert info.value.login_status == LoginStatus.AUTHENTICATION_FAILURE


def test_fresh_challenge_per_login() -> None:
    a, b = ChapAuthenticator(CREDS), ChapAuthenticator(CREDS)
    ca = dict(a.challenge("5"))["CHAP_C"]
    cb = dict(b.challenge("5"))["CHAP_C"]
    assert ca != cb and len(bytes.fromhex(ca[2:])) == 16


def test_verify_and_mutual_answer() -> None:
    auth = ChapAuthenticator(CREDS)
    sent = dict(auth.challenge("5"))
    ident, challenge = int(sent["CHAP_I"]), bytes.fromhex(sent["CHAP_C"][2:])
    response = hashlib.md5(bytes([ident]) + CREDS.secret + challenge).digest()
    mutual_challenge = b"initiator-chal"
    answer = dict(
        auth.verify(
            {
                "CHAP_N": "alice",
                "CHAP_R": encode_hex(response),
                "CHAP_I": "9",
                "CHAP_C": encode_hex(mutual_challenge),
            }
        )
    )
    assert answer["CHAP_N"] == "tgt"
    assert (
        answer["CHAP_R"]
        == "0x" + hashlib.md5(b"\x09" + b"fedcba9876543210" + mutual_challenge).hexdigest()
    )
    assert auth.warnings == []


def test_secrets_are_not_in_repr() -> None:
    assert "0123456789" not in repr(CREDS)


def test_weak_configuration_is_reported() -> None:
    auth = ChapAuthenticator(ChapCredentials("a", b"short", "t", b"short"))
    assert len(auth.warnings) == 3
