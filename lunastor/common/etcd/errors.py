"""The etcd error hierarchy: callers see these, never a raw grpc exception.

`error_from_status` is a pure function from a gRPC status (code + etcd's message) to one of
these classes, so the mapping is a table that unit tests can pin down.
"""

from __future__ import annotations

import grpc


class EtcdError(Exception):
    """Any failure talking to etcd."""


class EtcdConfigError(EtcdError, ValueError):
    """The `EtcdConfig` is unusable (bad endpoint, unreadable certificate, half credentials)."""


class EtcdRequestError(EtcdError, ValueError):
    """The request itself is wrong (bad key or value type, invalid txn, bad page token)."""


class EtcdFutureRevision(EtcdRequestError):
    """A read asked for a revision that etcd has not reached yet."""


class EtcdUnavailable(EtcdError):
    """No etcd endpoint answered (refused, unreachable, no leader). Retrying later may work."""


class EtcdTimeout(EtcdUnavailable):
    """The request ran out of time; for a write, it may or may not have been applied."""


class EtcdTlsError(EtcdUnavailable):
    """The TLS handshake failed (unknown CA, bad or missing client certificate): check config."""


class EtcdCompacted(EtcdError):
    """The requested revision was compacted away; re-list at a current revision."""

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message)
        #: Oldest revision still available, when etcd said so (watches do), else 0.
        self.compact_revision = compact_revision


class EtcdLeaseNotFound(EtcdError):
    """The lease does not exist (expired or revoked)."""


class EtcdLeaseLost(EtcdError):
    """A lease that something depended on (a campaign, a keeper) is gone."""


class EtcdAuthError(EtcdError):
    """Authentication failed: wrong user or password, or credentials missing."""


class EtcdPermissionDenied(EtcdAuthError):
    """The authenticated user may not do this."""


class EtcdTokenExpired(EtcdAuthError):
    """The auth token is no longer valid; the client re-authenticates and retries once."""


class EtcdNoSpace(EtcdError):
    """etcd raised its NOSPACE alarm: writes are refused until an operator frees space."""


class EtcdClosed(EtcdError):
    """The client was closed."""


# etcd's own messages, most specific first; matched as substrings of the status details.
_BY_MESSAGE: tuple[tuple[str, type[EtcdError]], ...] = (
    ("required revision has been compacted", EtcdCompacted),
    ("required revision is a future revision", EtcdFutureRevision),
    ("requested lease not found", EtcdLeaseNotFound),
    ("authentication failed", EtcdAuthError),
    ("invalid auth token", EtcdTokenExpired),
    ("user name is empty", EtcdAuthError),
    ("user name not found", EtcdAuthError),
    ("permission denied", EtcdPermissionDenied),
    ("database space exceeded", EtcdNoSpace),
    ("handshake failed", EtcdTlsError),
    ("ssl_error", EtcdTlsError),
    ("bad_certificate", EtcdTlsError),
    ("tsi_data_corrupted", EtcdTlsError),  # how gRPC reports the server refusing our cert
)

_BY_CODE: dict[grpc.StatusCode, type[EtcdError]] = {
    grpc.StatusCode.UNAVAILABLE: EtcdUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: EtcdTimeout,
    # A call cancelled by us closing a failed endpoint's channel: try the next one.
    grpc.StatusCode.CANCELLED: EtcdUnavailable,
    grpc.StatusCode.INVALID_ARGUMENT: EtcdRequestError,
    grpc.StatusCode.OUT_OF_RANGE: EtcdRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: EtcdRequestError,
    grpc.StatusCode.UNAUTHENTICATED: EtcdAuthError,
    grpc.StatusCode.PERMISSION_DENIED: EtcdPermissionDenied,
    grpc.StatusCode.NOT_FOUND: EtcdError,
}


def error_from_status(code: grpc.StatusCode, details: str, endpoint: str = "") -> EtcdError:
    """The `EtcdError` for a failed gRPC call to `endpoint`."""
    text = (details or code.name).strip()
    message = f"etcd {endpoint}: {text}" if endpoint else f"etcd: {text}"
    lowered = text.lower()
    for needle, cls in _BY_MESSAGE:
        if needle in lowered:
            return cls(message)
    return _BY_CODE.get(code, EtcdError)(message)


def never_sent(code: grpc.StatusCode, details: str) -> bool:
    """True when the request surely did not reach a member that could apply it.

    Writes are retried on another endpoint only then; otherwise a retried transaction could
    apply twice (a `create` that succeeded would report False the second time).
    """
    lowered = (details or "").lower()
    return code == grpc.StatusCode.UNAVAILABLE and (
        "failed to connect" in lowered
        or "connection refused" in lowered
        or "etcdserver: no leader" in lowered
        or "etcdserver: not capable" in lowered
    )
