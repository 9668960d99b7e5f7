"""How a daemon reaches etcd: endpoints, key namespace, timeout, TLS and credentials."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

from lunastor.common.etcd.errors import EtcdConfigError

# Channel options shared by the async client and the lease keeper's blocking channel.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # Notice a silently dead peer on long-lived watch streams. etcd refuses pings more often
    # than every 5 s (--grpc-keepalive-min-time), so stay above that.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # Reconnect fast after an etcd restart instead of gRPC's default 1 s..120 s backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # Pages of large records: etcd itself caps requests, not responses.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)


@dataclass(frozen=True)
class EtcdConfig:
    """Connection settings. Every key the client reads or writes is `namespace + key`."""

    #: "host:port" (or "http(s)://host:port", "[::1]:2379"); tried in order on failure.
    endpoints: list[str] = field(default_factory=lambda: ["127.0.0.1:2379"])
    #: Prefix prepended to every key, so several clusters and tests can share one etcd.
    namespace: str = ""
    #: Seconds allowed for one request to one endpoint.
    timeout: float = 5.0
    #: TLS: CA bundle that signed the etcd server certificates (enables TLS).
    ca_cert: str | None = None
    #: TLS client certificate and key (both or neither), for etcd's --client-cert-auth.
    cert: str | None = None
    key: str | None = None
    #: etcd auth (both or neither).
    user: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.endpoints, str) or not self.endpoints:
            raise EtcdConfigError("endpoints must be a non-empty list of 'host:port'")
        normalised = [parse_endpoint(e) for e in self.endpoints]
        object.__setattr__(self, "endpoints", normalised)
        if not isinstance(self.namespace, str):
            raise EtcdConfigError("namespace must be a str")
        if not self.timeout > 0:
            raise EtcdConfigError(f"timeout must be positive, not {self.timeout!r}")
        if (self.cert is None) != (self.key is None):
            raise EtcdConfigError("TLS client cert and key must be given together")
        if (self.user is None) != (self.password is None):
            raise EtcdConfigError("user and password must be given together")

    @property
    def tls(self) -> bool:
        return self.ca_cert is not None or self.cert is not None

    def credentials(self) -> grpc.ChannelCredentials | None:
        """gRPC channel credentials for TLS, or None for a plaintext channel."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_cert, "ca_cert"),
            private_key=_read(self.key, "key"),
            certificate_chain=_read(self.cert, "cert"),
        )


def parse_endpoint(endpoint: str) -> str:
    """Normalise one endpoint to "host:port"; raise `EtcdConfigError` if it is not one."""
    if not isinstance(endpoint, str):
        raise EtcdConfigError(f"endpoint must be a str, not {type(endpoint).__name__}")
    text = endpoint.strip()
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EtcdConfigError(f"endpoint {endpoint!r} is not 'host:port'")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise EtcdConfigError(f"endpoint {endpoint!r}: write IPv6 hosts as [addr]:port")
    return f"{host}:{int(port)}"


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise EtcdConfigError(f"cannot read TLS {what} {path!r}: {exc.strerror}") from exc
