"""Sealing secrets (CHAP secrets) before they go into etcd, with a key from configuration.

The `cryptography` package is not a dependency, so this is an encrypt-then-MAC construction
from the standard library only:

- two subkeys are derived from the configured key with HMAC-SHA256 (labels `enc` and `mac`);
- a fresh 16-byte random nonce per secret;
- keystream block i = HMAC-SHA256(enc_key, nonce || i as 8 bytes big-endian), XORed with the
  plain text (HMAC as a PRF in counter mode);
- tag = HMAC-SHA256(mac_key, "lunastor-seal-v1" || key id || nonce || cipher text), first 16
  bytes; checked in constant time before anything is decrypted.

The stored form is `v1:<key id>:<base64url(nonce || cipher text || tag)>`. The key id (8 hex
digits derived from the key) lets a reader say "sealed with another key" instead of "corrupt".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

FORMAT = "v1"
_NONCE = 16
_TAG = 16
_MAX_PLAIN = 4096


class SealError(ValueError):
    """A sealed value is malformed, was sealed with another key, or was tampered with."""


def _prf(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


class Sealer:
    """Seals and opens short secrets with one configured key (at least 16 characters)."""

    def __init__(self, key: str) -> None:
        if len(key) < 16:
            raise ValueError("the sealing key must be at least 16 characters")
        root = key.encode()
        self._enc = _prf(root, b"lunastor-seal enc")
        self._mac = _prf(root, b"lunastor-seal mac")
        self.key_id = _prf(root, b"lunastor-seal id").hex()[:8]

    def _keystream(self, nonce: bytes, length: int) -> bytes:
        blocks = (length + 31) // 32
        return b"".join(_prf(self._enc, nonce + i.to_bytes(8, "big")) for i in range(blocks))[
            :length
        ]

    def _tag(self, nonce: bytes, cipher: bytes) -> bytes:
        header = f"lunastor-seal-{FORMAT}{self.key_id}".encode()
        return _prf(self._mac, header + nonce + cipher)[:_TAG]

    def seal(self, plain: str) -> str:
        data = plain.encode()
        if len(data) > _MAX_PLAIN:
            raise ValueError(f"secret too long to seal ({len(data)} bytes)")
        nonce = os.urandom(_NONCE)
        cipher = bytes(a ^ b for a, b in zip(data, self._keystream(nonce, len(data)), strict=True))
        blob = base64.urlsafe_b64encode(nonce + cipher + self._tag(nonce, cipher)).decode()
        return f"{FORMAT}:{self.key_id}:{blob}"

    def open(self, sealed: str) -> str:
        parts = sealed.split(":")
        if len(parts) != 3 or parts[0] != FORMAT:
            raise SealError("not a sealed value")
        if parts[1] != self.key_id:
            raise SealError(f"sealed with another key (key id {parts[1]}, ours {self.key_id})")
        try:
            raw = base64.urlsafe_b64decode(parts[2].encode())
        except ValueError:
            raise SealError("sealed value is not base64") from None
        if len(raw) < _NONCE + _TAG:
            raise SealError("sealed value too short")
        nonce, cipher, tag = raw[:_NONCE], raw[_NONCE:-_TAG], raw[-_TAG:]
        if not hmac.compare_digest(tag, self._tag(nonce, cipher)):
            raise SealError("sealed value fails its integrity check")
        stream = self._keystream(nonce, len(cipher))
        plain = bytes(a ^ b for a, b in zip(cipher, stream, strict=True))
        try:
            return plain.decode()
        except UnicodeDecodeError:
            raise SealError("sealed value is not text") from None
