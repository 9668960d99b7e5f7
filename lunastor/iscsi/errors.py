"""iSCSI protocol errors, split the way h11 splits them.

`RemoteProtocolError`: the peer sent something wrong. It carries the hint the session layer
needs to answer: a Reject reason (RFC 7143 11.17.1) plus the offending 48-byte header when
known, or a login status class/detail (RFC 7143 11.13.5) for failures during login.

`LocalProtocolError`: we were asked to build something the protocol cannot express (a field out
of range, an invalid text key). It is a bug on our side, never the peer's.

Framing errors (`FramingError`, `HeaderDigestError`) mean the byte stream can no longer be
split into PDUs: the connection must be dropped. Any other `RemoteProtocolError` consumed
exactly one PDU; the connection may answer with a Reject and carry on.
"""

from __future__ import annotations

from enum import IntEnum


class RejectReason(IntEnum):
    """Reject PDU reason codes (RFC 7143 11.17.1)."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OP_REJECT = 0x0A
    NEGOTIATION_RESET = 0x0B  # deprecated by RFC 7143, kept so received codes decode
    WAITING_FOR_LOGOUT = 0x0C


class LoginStatus(IntEnum):
    """Login Response Status-Class << 8 | Status-Detail (RFC 7143 11.13.5)."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302

    @property
    def status_class(self) -> int:
        return self.value >> 8

    @property
    def status_detail(self) -> int:
        return self.value & 0xFF


class ProtocolError(Exception):
    """Base of every error this package raises for protocol reasons."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow.

    `reason` is the Reject reason to answer with in Full Feature Phase; `header` the offending
    48-byte BHS (the Reject data segment) when known; `login_status` the Login Response status
    to answer with when the error happens during login.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: RejectReason = RejectReason.PROTOCOL_ERROR,
        header: bytes | None = None,
        login_status: LoginStatus = LoginStatus.INITIATOR_ERROR,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.header = header
        self.login_status = login_status

    @property
    def status_class(self) -> int:
        return self.login_status.status_class

    @property
    def status_detail(self) -> int:
        return self.login_status.status_detail


class FramingError(RemoteProtocolError):
    """The byte stream cannot be split into PDUs any more: drop the connection.

    Raised by `PduReader` for lengths beyond our limits; once raised, the reader stays broken.
    """


class HeaderDigestError(FramingError):
    """Header digest mismatch: the lengths in the header cannot be trusted, drop the connection."""


class DataDigestError(RemoteProtocolError):
    """Data digest mismatch: the PDU was discarded; answer with Reject reason 0x02 and go on."""

    def __init__(self, message: str, *, header: bytes | None = None) -> None:
        super().__init__(message, reason=RejectReason.DATA_DIGEST_ERROR, header=header)


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol cannot express (our bug, not the peer's)."""
