"""CHAP for iSCSI login, target side (RFC 1994, RFC 7143 12.1.3), MD5 only (CHAP_A=5).

The target sends CHAP_A, a fresh identifier CHAP_I and a fresh random challenge CHAP_C; the
initiator answers CHAP_N (its user name) and CHAP_R = MD5(CHAP_I || secret || CHAP_C). For
mutual CHAP the initiator adds its own CHAP_I/CHAP_C and we answer with our CHAP_N/CHAP_R.

Binary values travel as hex (`0x...`) or base64 (`0b...`); we send hex. Responses are compared
in constant time. A challenge from the initiator equal to ours (a reflection attack) is
refused. Secrets shorter than 12 bytes are accepted but reported in `warnings` (RFC 7143
12.1.3 asks for at least 96 bits).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lunastor.iscsi.errors import LoginStatus, RejectReason, RemoteProtocolError

CHAP_MD5 = 5
MIN_SECRET_LENGTH = 12
CHALLENGE_LENGTH = 16
MAX_CHALLENGE_LENGTH = 1024


@dataclass(frozen=True, slots=True)
class ChapCredentials:
    """What the initiator must prove (`username`/`secret`), and for mutual CHAP what we prove
    back (`mutual_username`/`mutual_secret`)."""

    username: str
    secret: bytes
    mutual_username: str | None = None
    mutual_secret: bytes | None = None

    def __repr__(self) -> str:  # never print secrets into logs
        return (
            f"ChapCredentials(username={self.username!r}, mutual={self.mutual_secret is not None})"
        )


def auth_failure(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(
        message, reason=RejectReason.PROTOCOL_ERROR, login_status=LoginStatus.AUTHENTICATION_FAILURE
    )


def decode_binary(key: str, value: str) -> bytes:
    """A binary value: `0x`/`0X` hex (odd digit counts allowed) or `0b`/`0B` base64."""
    prefix, body = value[:2], value[2:]
    try:
        if prefix in ("0x", "0X") and body:
            return bytes.fromhex(body if len(body) % 2 == 0 else "0" + body)
        if prefix in ("0b", "0B") and body:
            return base64.b64decode(body, validate=True)
    except (ValueError, binascii.Error):
        pass
    raise auth_failure(f"{key} is not a hex or base64 binary value")


def encode_hex(data: bytes) -> str:
    return "0x" + data.hex()


def chap_response(identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994 4.1: MD5 over the identifier octet, the secret and the challenge."""
    return hashlib.md5(bytes([identifier]) + secret + challenge, usedforsecurity=True).digest()


class ChapAuthenticator:
    """The target's side of one CHAP exchange. `challenge()` then `verify()`.

    `random_bytes` is injectable so tests can pin the challenge; production uses `secrets`.
    """

    def __init__(
        self,
        credentials: ChapCredentials,
        *,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.credentials = credentials
        self._random = random_bytes
        self.identifier = -1
        self.challenge_bytes = b""
        self.warnings: list[str] = []
        if len(credentials.secret) < MIN_SECRET_LENGTH:
            self.warnings.append(f"CHAP secret for {credentials.username!r} shorter than 12 bytes")
        if credentials.mutual_secret is not None:
            if len(credentials.mutual_secret) < MIN_SECRET_LENGTH:
                self.warnings.append("mutual CHAP secret shorter than 12 bytes")
            if hmac.compare_digest(credentials.mutual_secret, credentials.secret):
                self.warnings.append("mutual CHAP secret equals the initiator's secret")

    def challenge(self, offered_algorithms: str) -> list[tuple[str, str]]:
        """Answer the initiator's CHAP_A list with CHAP_A, CHAP_I and CHAP_C."""
        if str(CHAP_MD5) not in offered_algorithms.split(","):
            raise auth_failure(f"no supported CHAP algorithm in CHAP_A={offered_algorithms[:40]!r}")
        self.identifier = self._random(1)[0]
        self.challenge_bytes = self._random(CHALLENGE_LENGTH)
        return [
            ("CHAP_A", str(CHAP_MD5)),
            ("CHAP_I", str(self.identifier)),
            ("CHAP_C", encode_hex(self.challenge_bytes)),
        ]

    def verify(self, keys: Mapping[str, str]) -> list[tuple[str, str]]:
        """Check CHAP_N/CHAP_R; for mutual CHAP answer the initiator's CHAP_I/CHAP_C."""
        if self.identifier < 0:
            raise auth_failure("CHAP response before a challenge")
        name = keys.get("CHAP_N")
        response = keys.get("CHAP_R")
        if name is None or response is None:
            raise auth_failure("CHAP_N and CHAP_R are both required")
        expected = chap_response(self.identifier, self.credentials.secret, self.challenge_bytes)
        got = decode_binary("CHAP_R", response)
        # compare both name and response before deciding, so timing says nothing about which
        name_ok = hmac.compare_digest(name.encode(), self.credentials.username.encode())
        response_ok = hmac.compare_digest(got, expected)
        if not (name_ok and response_ok):
            raise auth_failure("CHAP authentication failed")
        if "CHAP_I" not in keys and "CHAP_C" not in keys:
            return []
        return self._mutual(keys)

    def _mutual(self, keys: Mapping[str, str]) -> list[tuple[str, str]]:
        if "CHAP_I" not in keys or "CHAP_C" not in keys:
            raise auth_failure("mutual CHAP needs both CHAP_I and CHAP_C")
        creds = self.credentials
        if creds.mutual_secret is None or creds.mutual_username is None:
            raise auth_failure("initiator asked for mutual CHAP, none configured")
        raw_id = keys["CHAP_I"]
        if not raw_id.isdecimal() or int(raw_id) > 255:
            raise auth_failure("CHAP_I is not an identifier 0-255")
        challenge = decode_binary("CHAP_C", keys["CHAP_C"])
        if not 1 <= len(challenge) <= MAX_CHALLENGE_LENGTH:
            raise auth_failure("CHAP_C length out of range")
        if hmac.compare_digest(challenge, self.challenge_bytes):
            raise auth_failure("initiator reflected our own CHAP challenge")
        ours = chap_response(int(raw_id), creds.mutual_secret, challenge)
        return [("CHAP_N", creds.mutual_username), ("CHAP_R", encode_hex(ours))]
