"""Pure parts of the etcd client: error mapping, endpoint parsing, key ranges, compares."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lunastor.common.etcd import (
    Compare,
    EtcdAuthError,
    EtcdCompacted,
    EtcdConfig,
    EtcdConfigError,
    EtcdError,
    EtcdFutureRevision,
    EtcdLeaseNotFound,
    EtcdNoSpace,
    EtcdPermissionDenied,
    EtcdRequestError,
    EtcdTimeout,
    EtcdTlsError,
    EtcdUnavailable,
)
from lunastor.common.etcd.config import parse_endpoint
from lunastor.common.etcd.errors import EtcdTokenExpired, error_from_status, never_sent
from lunastor.common.etcd.model import CompareTarget, Keyspace, range_end

C = grpc.StatusCode

# (code, etcd's message, expected class): messages as etcd 3.4 sends them.
ERRORS = [
    (C.OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted", EtcdCompacted),
    (
        C.OUT_OF_RANGE,
        "etcdserver: mvcc: required revision is a future revision",
        EtcdFutureRevision,
    ),
    (C.NOT_FOUND, "etcdserver: requested lease not found", EtcdLeaseNotFound),
    (
        C.INVALID_ARGUMENT,
        "etcdserver: authentication failed, invalid user ID or password",
        EtcdAuthError,
    ),
    (C.UNAUTHENTICATED, "etcdserver: invalid auth token", EtcdTokenExpired),
    (C.INVALID_ARGUMENT, "etcdserver: user name is empty", EtcdAuthError),
    (C.PERMISSION_DENIED, "etcdserver: permission denied", EtcdPermissionDenied),
    (C.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded", EtcdNoSpace),
    (C.UNAVAILABLE, "etcdserver: no leader", EtcdUnavailable),
    (C.UNAVAILABLE, "etcdserver: request timed out", EtcdUnavailable),
    (C.DEADLINE_EXCEEDED, "Deadline Exceeded", EtcdTimeout),
    (C.CANCELLED, "Cancelled", EtcdUnavailable),
    (C.INVALID_ARGUMENT, "etcdserver: duplicate key given in txn request", EtcdRequestError),
    (
        C.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
        "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL",
        EtcdTlsError,
    ),
    (C.UNKNOWN, "something new", EtcdError),
]


@pytest.mark.parametrize(("code", "details", "cls"), ERRORS)
def test_status_maps_to_one_error_class(code: grpc.StatusCode, details: str, cls: type) -> None:
    err = error_from_status(code, details, "10.0.0.1:2379")
    assert type(err) is cls
    assert str(err) == f"etcd 10.0.0.1:2379: {details}"


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (C.UNAVAILABLE, "failed to connect to all addresses; ... Connection refused", True),
        (C.UNAVAILABLE, "etcdserver: no leader", True),
        (C.UNAVAILABLE, "etcdserver: request timed out", False),  # may still commit
        (C.UNAVAILABLE, "Socket closed", False),
        (C.DEADLINE_EXCEEDED, "failed to connect", False),
    ],
)
def test_never_sent_only_when_certain(code: grpc.StatusCode, details: str, expected: bool) -> None:
    assert never_sent(code, details) is expected


@pytest.mark.parametrize(
    ("given_", "expected"),
    [
        ("127.0.0.1:2379", "127.0.0.1:2379"),
        ("http://etcd-0.etcd:2379", "etcd-0.etcd:2379"),
        ("https://10.1.2.3:2379/", "10.1.2.3:2379"),
        ("[::1]:2379", "[::1]:2379"),
        (" localhost:02379 ", "localhost:2379"),
    ],
)
def test_endpoints_are_normalised(given_: str, expected: str) -> None:
    assert parse_endpoint(given_) == expected


@pytest.mark.parametrize(
    "bad", ["localhost", "localhost:", ":2379", "host:port", "host:0", "host:65536", "::1:2379", 7]
)
def test_bad_endpoints_are_config_errors(bad: str) -> None:
    with pytest.raises(EtcdConfigError):
        parse_endpoint(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"endpoints": []},
        {"endpoints": "127.0.0.1:2379"},
        {"timeout": 0},
        {"cert": "c.pem"},
        {"key": "k.pem"},
        {"user": "root"},
        {"password": "pw"},
    ],
)
def test_bad_configs_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(EtcdConfigError):
        EtcdConfig(**kwargs)  # type: ignore[arg-type]


def test_config_tls_only_when_asked() -> None:
    assert EtcdConfig().credentials() is None
    assert not EtcdConfig().tls and EtcdConfig(ca_cert="/ca.pem").tls


@pytest.mark.parametrize(
    ("prefix", "end"),
    [(b"a/", b"a0"), (b"a\xff", b"b"), (b"a\xff\xff", b"b"), (b"", b"\0"), (b"\xff", b"\0")],
)
def test_range_end_table(prefix: bytes, end: bytes) -> None:
    assert range_end(prefix) == end


@given(st.binary(min_size=1, max_size=8), st.binary(max_size=8))
def test_range_end_covers_exactly_the_prefix(prefix: bytes, suffix: bytes) -> None:
    end = range_end(prefix)
    assert prefix <= prefix + suffix
    if prefix.strip(b"\xff"):
        assert prefix + suffix < end
        assert not end.startswith(prefix)


@given(st.text(max_size=10), st.text(max_size=10))
def test_keyspace_round_trips(namespace: str, key: str) -> None:
    keys = Keyspace(namespace)
    raw = keys.encode(key)
    assert raw.startswith(namespace.encode()) and keys.decode(raw) == key


def test_keyspace_rejects_bytes_keys() -> None:
    with pytest.raises(EtcdRequestError):
        Keyspace("/ns/").encode(b"key")  # type: ignore[arg-type]


def test_compare_builders() -> None:
    assert (Compare.mod_revision("k") == 5) == Compare("k", CompareTarget.MOD, "==", 5)
    assert (Compare.version("k") > 0) == Compare("k", CompareTarget.VERSION, ">", 0)
    assert (Compare.create_revision("k") < 9).op == "<"
    assert (Compare.value("k") != b"v").operand == b"v"
    assert (Compare.lease("k") == 0x1234).target is CompareTarget.LEASE
