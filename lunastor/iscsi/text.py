"""Text segments of Login and Text PDUs: key=value pairs, each followed by a NUL (RFC 7143 6.1).

A key is 1-63 characters from letters, digits and `.-+@_` (and `#` for `X#` keys); a value
is UTF-8, at most 8192 bytes here (the per-key limits, 255 for most keys, are checked in
`params`). Keys and values may be split across PDUs with the C bit: concatenate the data
segments before parsing.

Received text deviates from the RFC in one tolerated way: a missing NUL after the last pair
and empty items between NULs are accepted, because they carry no ambiguity.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from lunastor.iscsi.errors import (
    LocalProtocolError,
    LoginStatus,
    RejectReason,
    RemoteProtocolError,
)

MAX_KEY_LENGTH = 63
MAX_VALUE_LENGTH = 8192
# 6.1 allows letters, digits and .-+@_ ; 13.5.2 X#<IANA name> keys add "#"
_KEY = re.compile(rb"[A-Za-z0-9.\-+@_#]{1,63}")


def _malformed(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(
        message, reason=RejectReason.PROTOCOL_ERROR, login_status=LoginStatus.INITIATOR_ERROR
    )


def parse_text(data: bytes | bytearray | memoryview) -> list[tuple[str, str]]:
    """The key=value pairs of a (reassembled) text data segment, in order, duplicates kept."""
    pairs: list[tuple[str, str]] = []
    for item in bytes(data).split(b"\0"):
        if not item:
            continue
        key, eq, value = item.partition(b"=")
        if not eq:
            raise _malformed(f"text item without '=': {item[:80]!r}")
        if _KEY.fullmatch(key) is None:
            raise _malformed(f"invalid text key {key[:80]!r}")
        if len(value) > MAX_VALUE_LENGTH:
            raise _malformed(f"value of {key.decode()} longer than {MAX_VALUE_LENGTH} bytes")
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed(f"value of {key.decode()} is not UTF-8") from None
        pairs.append((key.decode("ascii"), text))
    return pairs


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """`key=value\\0` for every pair; LocalProtocolError for keys/values the RFC cannot carry."""
    out = bytearray()
    for key, value in pairs:
        k = key.encode("utf-8")
        v = value.encode("utf-8")
        if _KEY.fullmatch(k) is None:
            raise LocalProtocolError(f"invalid text key {key!r}")
        if b"\0" in v or len(v) > MAX_VALUE_LENGTH:
            raise LocalProtocolError(f"invalid value for {key}")
        out += k + b"=" + v + b"\0"
    return bytes(out)
