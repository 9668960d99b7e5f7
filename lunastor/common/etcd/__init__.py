"""The one way lunastor daemons talk to etcd. See docs/etcd-client.md."""

from lunastor.common.etcd.cache import PrefixCache
from lunastor.common.etcd.client import Etcd
from lunastor.common.etcd.config import EtcdConfig
from lunastor.common.etcd.election import Election
from lunastor.common.etcd.errors import (
    EtcdAuthError,
    EtcdClosed,
    EtcdCompacted,
    EtcdConfigError,
    EtcdError,
    EtcdFutureRevision,
    EtcdLeaseLost,
    EtcdLeaseNotFound,
    EtcdNoSpace,
    EtcdPermissionDenied,
    EtcdRequestError,
    EtcdTimeout,
    EtcdTlsError,
    EtcdUnavailable,
)
from lunastor.common.etcd.lease import LeaseKeeper
from lunastor.common.etcd.model import (
    Compare,
    Delete,
    EventType,
    Get,
    KeyValue,
    Page,
    Put,
    TxnResult,
    WatchEvent,
    WatchItem,
    WatchResync,
)

__all__ = [
    "Compare",
    "Delete",
    "Election",
    "Etcd",
    "EtcdAuthError",
    "EtcdClosed",
    "EtcdCompacted",
    "EtcdConfig",
    "EtcdConfigError",
    "EtcdError",
    "EtcdFutureRevision",
    "EtcdLeaseLost",
    "EtcdLeaseNotFound",
    "EtcdNoSpace",
    "EtcdPermissionDenied",
    "EtcdRequestError",
    "EtcdTimeout",
    "EtcdTlsError",
    "EtcdUnavailable",
    "EventType",
    "Get",
    "KeyValue",
    "LeaseKeeper",
    "Page",
    "PrefixCache",
    "Put",
    "TxnResult",
    "WatchEvent",
    "WatchItem",
    "WatchResync",
]
