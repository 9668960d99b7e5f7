"""Records the daemons keep in etcd, and where they keep them (docs/etcd-schema.md).

Writers and readers share these types, so they agree on the format. Every record carries a
format version `v`; readers accept the current and the previous one (ARCHITECTURE.md,
"Versions"). Records are JSON: small, and readable with `etcdctl get`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

R = TypeVar("R", bound="Record")

SCHEMA = "v1"  # the versioned key prefix below the cluster namespace


class RecordError(ValueError):
    """A stored record could not be decoded (wrong format, unsupported version)."""


class Keys:
    """Key layout under the cluster namespace (the etcd client prepends the namespace)."""

    CHUNKS = f"/{SCHEMA}/chunks/"  # persistent registration, one per chunk server ever seen
    LIVE_CHUNKS = f"/{SCHEMA}/live/chunks/"  # lease-bound status: present while alive
    LIVE_META = f"/{SCHEMA}/live/meta/"  # lease-bound, one per meta instance
    LIVE_REDIRECTORS = f"/{SCHEMA}/live/redirectors/"  # lease-bound, one per redirector
    REDIRECTOR_ELECTION = f"/{SCHEMA}/election/redirector"  # leader election name

    @staticmethod
    def chunk(chunk_id: str) -> str:
        return Keys.CHUNKS + chunk_id

    @staticmethod
    def live_chunk(chunk_id: str) -> str:
        return Keys.LIVE_CHUNKS + chunk_id


@dataclass
class Record:
    """Base for JSON records with a format version."""

    VERSION: ClassVar[int] = 1
    ACCEPTS: ClassVar[tuple[int, ...]] = (1,)

    def to_json(self) -> bytes:
        body = {"v": self.VERSION, **dataclasses.asdict(self)}
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls: type[R], raw: bytes | str) -> R:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RecordError(f"{cls.__name__}: not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RecordError(f"{cls.__name__}: expected an object")
        version = data.pop("v", None)
        if version not in cls.ACCEPTS:
            raise RecordError(f"{cls.__name__}: unsupported format version {version!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise RecordError(f"{cls.__name__}: {exc}") from None


@dataclass
class DataDirCapacity:
    path: str
    capacity: int  # bytes the file system holds
    free: int  # bytes available to lunastor


@dataclass
class ChunkServerInfo(Record):
    """Persistent registration: written when a chunk server first starts and on address changes.

    It outlives the process, so the cluster can show a dead chunk server as "down".
    """

    id: str = ""
    portal: str = ""  # advertised iSCSI portal, host:port
    data_address: str = ""  # advertised chunk-to-chunk data port, host:port
    zone: str = "default"
    registered_at: float = 0.0


@dataclass
class ChunkServerStatus(Record):
    """Lease-bound status: exists exactly while the chunk server's lease is alive."""

    id: str = ""
    portal: str = ""
    data_address: str = ""
    admin_address: str = ""
    zone: str = "default"
    state: str = "up"  # up | draining (down is the absence of this record)
    version: str = ""
    started_at: float = 0.0
    lease: int = 0
    data_dirs: list[dict[str, Any]] = field(default_factory=list)  # DataDirCapacity as dicts

    @property
    def capacity(self) -> int:
        return sum(int(d.get("capacity", 0)) for d in self.data_dirs)

    @property
    def free(self) -> int:
        return sum(int(d.get("free", 0)) for d in self.data_dirs)


@dataclass
class MetaInstance(Record):
    id: str = ""
    api_url: str = ""
    version: str = ""
    started_at: float = 0.0


@dataclass
class RedirectorInstance(Record):
    id: str = ""
    vip: str = ""  # the portal address this instance serves when it leads, host:port
    admin_address: str = ""
    version: str = ""
    started_at: float = 0.0
