"""Typed values the etcd client takes and returns: key-values, pages, txn parts, watch events."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Literal

from lunastor.common.etcd.errors import EtcdRequestError


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd stores it. `key` is relative to the client's namespace."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    #: Lease the key is attached to; 0 when none.
    lease: int = 0


@dataclass(frozen=True)
class Page:
    """One page of a prefix listing, read at `revision`; `more` says another page follows."""

    kvs: list[KeyValue]
    revision: int
    more: bool

    @property
    def last_key(self) -> str | None:
        """The `start_after` for the next page (None on an empty page)."""
        return self.kvs[-1].key if self.kvs else None


class Keyspace:
    """Maps the caller's `str` keys into the configured namespace and back."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._ns = namespace.encode()

    def encode(self, key: str) -> bytes:
        if not isinstance(key, str):
            raise EtcdRequestError(f"etcd keys are str, not {type(key).__name__}")
        # surrogateescape: keys written by other tools that are not UTF-8 still round-trip.
        return self._ns + key.encode("utf-8", "surrogateescape")

    def decode(self, raw: bytes) -> str:
        return raw[len(self._ns) :].decode("utf-8", "surrogateescape")

    def prefix_range(self, prefix: str) -> tuple[bytes, bytes]:
        """[start, end) covering every key that starts with `prefix`."""
        start = self.encode(prefix)
        return start, range_end(start)

    def kv(self, pb: Any) -> KeyValue:
        """A `KeyValue` from etcd's protobuf mvccpb.KeyValue."""
        return KeyValue(
            key=self.decode(pb.key),
            value=bytes(pb.value),
            create_revision=pb.create_revision,
            mod_revision=pb.mod_revision,
            version=pb.version,
            lease=pb.lease,
        )


def range_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with `prefix` (etcd's range_end)."""
    s = bytearray(prefix)
    while s:
        if s[-1] < 0xFF:
            s[-1] += 1
            return bytes(s)
        s.pop()
    return b"\0"  # empty prefix (or all 0xff): to the end of the keyspace


def check_value(value: object) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise EtcdRequestError(f"etcd values are bytes, not {type(value).__name__}")
    return bytes(value)


# --- transactions -----------------------------------------------------------------------


class CompareTarget(enum.Enum):
    VERSION = 0
    CREATE = 1
    MOD = 2
    VALUE = 3
    LEASE = 4


CompareOp = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True)
class Compare:
    """One txn condition. Build it as `Compare.mod_revision(key) == rev` and the like."""

    key: str
    target: CompareTarget
    op: CompareOp
    operand: int | bytes

    def __post_init__(self) -> None:
        if self.op not in ("==", "!=", "<", ">"):
            raise EtcdRequestError(f"compare operator must be ==, !=, < or >, not {self.op!r}")
        if self.target is CompareTarget.VALUE:
            object.__setattr__(self, "operand", check_value(self.operand))
        elif not isinstance(self.operand, int) or isinstance(self.operand, bool):
            raise EtcdRequestError(
                f"{self.target.name.lower()} compares take an int, "
                f"not {type(self.operand).__name__}"
            )

    @staticmethod
    def version(key: str) -> CompareOperand:
        """Number of writes since creation; `== 0` means the key is absent."""
        return CompareOperand(key, CompareTarget.VERSION)

    @staticmethod
    def create_revision(key: str) -> CompareOperand:
        return CompareOperand(key, CompareTarget.CREATE)

    @staticmethod
    def mod_revision(key: str) -> CompareOperand:
        """Revision of the last write; the compare-and-swap guard for every metadata change."""
        return CompareOperand(key, CompareTarget.MOD)

    @staticmethod
    def value(key: str) -> CompareOperand:
        return CompareOperand(key, CompareTarget.VALUE)

    @staticmethod
    def lease(key: str) -> CompareOperand:
        """Lease the key is attached to (0 when none)."""
        return CompareOperand(key, CompareTarget.LEASE)


@dataclass(frozen=True)
class CompareOperand:
    """Left side of a comparison; the operators build the `Compare`."""

    key: str
    target: CompareTarget

    def __eq__(self, other: object) -> Compare:  # type: ignore[override]
        return Compare(self.key, self.target, "==", other)  # type: ignore[arg-type]

    def __ne__(self, other: object) -> Compare:  # type: ignore[override]
        return Compare(self.key, self.target, "!=", other)  # type: ignore[arg-type]

    def __lt__(self, other: object) -> Compare:
        return Compare(self.key, self.target, "<", other)  # type: ignore[arg-type]

    def __gt__(self, other: object) -> Compare:
        return Compare(self.key, self.target, ">", other)  # type: ignore[arg-type]

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int | None = None


@dataclass(frozen=True)
class Delete:
    """Delete `key`, or every key starting with it when `prefix`."""

    key: str
    prefix: bool = False


@dataclass(frozen=True)
class Get:
    """Read `key`, or every key starting with it when `prefix`; at most `limit` keys (0: all,
    etcd's own convention): `limit=1` asks whether a prefix holds anything."""

    key: str
    prefix: bool = False
    limit: int = 0


Op = Put | Delete | Get

#: Per-op result: Get -> list[KeyValue], Delete -> number of keys deleted, Put -> None.
OpResult = list[KeyValue] | int | None


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    #: One entry per op of the branch that ran (see `OpResult`).
    responses: list[OpResult]
    #: Store revision after the txn (the write's revision if it wrote).
    revision: int


# --- watches ----------------------------------------------------------------------------


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    """A key changed. For DELETE, `kv` has the key and the deletion's mod_revision only."""

    type: EventType
    kv: KeyValue
    revision: int


@dataclass(frozen=True)
class WatchResync:
    """The watched revision was compacted: `kvs` is the whole prefix at `revision`.

    Replace your state with `kvs`; events continue from `revision + 1`.
    """

    kvs: list[KeyValue]
    revision: int


WatchItem = WatchEvent | WatchResync
