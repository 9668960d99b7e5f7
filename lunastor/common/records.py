"""Records the daemons keep in etcd, and where they keep them (docs/etcd-schema.md).

Writers and readers share these types, so they agree on the format. Every record carries a
format version `v`; readers accept the current and the previous one (ARCHITECTURE.md,
"Versions"). Records are JSON: small, and readable with `etcdctl get`.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar
from urllib.parse import quote

R = TypeVar("R", bound="Record")

SCHEMA = "v1"  # the versioned key prefix below the cluster namespace


class RecordError(ValueError):
    """A stored record could not be decoded (wrong format, unsupported version)."""


class StoredValue(Protocol):
    """What decode_records needs of a stored key (an etcd KeyValue)."""

    @property
    def key(self) -> str: ...

    @property
    def value(self) -> bytes: ...


def decode_records(
    kvs: Iterable[StoredValue],
    cls: type[R],
    on_error: Callable[[str, RecordError], None] | None = None,
) -> list[R]:
    """The records of `kvs` that decode; an undecodable one is skipped (and handed to
    `on_error`), never fatal: one bad key must not take a listing or a planner down."""
    out = []
    for kv in kvs:
        try:
            out.append(cls.from_json(kv.value))
        except RecordError as exc:
            if on_error is not None:
                on_error(kv.key, exc)
    return out


class Keys:
    """Key layout under the cluster namespace (the etcd client prepends the namespace)."""

    CHUNKS = f"/{SCHEMA}/chunks/"  # persistent registration, one per chunk server ever seen
    LIVE_CHUNKS = f"/{SCHEMA}/live/chunks/"  # lease-bound status: present while alive
    LIVE_META = f"/{SCHEMA}/live/meta/"  # lease-bound, one per meta instance
    LIVE_REDIRECTORS = f"/{SCHEMA}/live/redirectors/"  # lease-bound, one per redirector
    # lease-bound, one per chunk server serving iSCSI: the revision of RESERVATIONS it enforces
    LIVE_RESERVATIONS_APPLIED = f"/{SCHEMA}/live/reservations-applied/"
    # lease-bound, /<volume>/<chunk>: an access point's demand on a limited volume (docs/qos.md)
    LIVE_QOS_DEMAND = f"/{SCHEMA}/live/qos-demand/"
    REDIRECTOR_ELECTION = f"/{SCHEMA}/election/redirector"  # leader election name
    PLANNER_ELECTION = f"/{SCHEMA}/election/planner"  # meta's single background planner

    # Written by meta (docs/etcd-schema.md has the table).
    VOLUMES = f"/{SCHEMA}/volumes/"  # VolumeRecord per volume id
    VOLUME_NAMES = f"/{SCHEMA}/names/volumes/"  # name -> volume id (the uniqueness guard)
    LUNS = f"/{SCHEMA}/luns/"  # LunRecord per (target, LUN): the LUN map and its ACL
    TARGETS = f"/{SCHEMA}/targets/"  # TargetRecord: per-target settings (CHAP)
    DISCOVERY_CHAP = f"/{SCHEMA}/discovery-chap"  # ChapRecord for discovery sessions
    SNAPSHOTS = f"/{SCHEMA}/snapshots/"  # SnapshotRecord per snapshot id
    SNAPSHOT_NAMES = f"/{SCHEMA}/names/snapshots/"  # name -> snapshot id
    CHUNK_ADMIN = f"/{SCHEMA}/chunk-admin/"  # ChunkAdminRecord: operator intent (drain)
    OPERATIONS = f"/{SCHEMA}/operations/"  # OperationRecord: long-running jobs
    GC_VOLUMES = f"/{SCHEMA}/gc/volumes/"  # deleted volume ids whose extents await collection
    GC_SNAPSHOTS = f"/{SCHEMA}/gc/snapshots/"  # deleted snapshots whose copies await collection
    GC_REPLICAS = f"/{SCHEMA}/gc/replicas/"  # /<chunk>/<store volume>/<index>: files to delete
    LIVE_SEEN = f"/{SCHEMA}/live/seen/"  # /<chunk>: volumes revision its data path has applied
    # The extent map (common/extent_pages.py): /<volume>/p<page>: a page of extents; the
    # layout before pages, /<volume>/<index 8 digits>: one ExtentRecord, is still read
    EXTENTS = f"/{SCHEMA}/extents/"
    CHUNK_EXTENTS = f"/{SCHEMA}/chunk-extents/"  # /<chunk>/<bucket>: reverse index shard
    RESERVATIONS = f"/{SCHEMA}/reservations/"  # /<volume>: SCSI reservations (chunk/reservations)
    # meta's rebalance planner: /<volume>/<index>: MoveRecord, carried out by the primary
    REBALANCE = f"/{SCHEMA}/rebalance/"
    # /<chunk>: ScrubErrorsRecord, the blocks its last scrub pass could not repair
    SCRUB_ERRORS = f"/{SCHEMA}/scrub-errors/"
    # /<volume>/<index>: LocalityClaim, an access point asking to hold the extent's primary
    LOCALITY = f"/{SCHEMA}/locality/"
    # Written by the data path (docs/datapath.md).
    RINGS = f"/{SCHEMA}/rings/"  # /<replicas>: the placement ring (Ring.to_dict() as JSON)
    CLUSTER_CONFIG = f"/{SCHEMA}/cluster-config"  # ClusterConfigRecord: extent size
    TARGET_PORTS = f"/{SCHEMA}/target-ports/"  # /<n, 5 digits>: chunk id holding relative port n
    # /<target iqn>/<initiator port>, both percent-encoded: the access point holding the
    # nexus's latest login; its mod_revision is the nexus epoch (docs/datapath.md, "Fencing")
    NEXUS_EPOCHS = f"/{SCHEMA}/nexus-epochs/"
    # /<microseconds, 17 digits>-<random>: EventRecord, the recent events (common/events.py)
    EVENTS = f"/{SCHEMA}/events/"
    # /<chunk>: PlannedStop, a chunk server stopped on purpose (or starting), expected back
    PLANNED_STOPS = f"/{SCHEMA}/planned-stops/"

    @staticmethod
    def chunk(chunk_id: str) -> str:
        return Keys.CHUNKS + chunk_id

    @staticmethod
    def nexus_epoch(initiator_port: str, target: str) -> str:
        return f"{Keys.NEXUS_EPOCHS}{quote(target, safe=':.,')}/{quote(initiator_port, safe=':.,')}"

    @staticmethod
    def planned_stop(chunk_id: str) -> str:
        return Keys.PLANNED_STOPS + chunk_id

    @staticmethod
    def live_chunk(chunk_id: str) -> str:
        return Keys.LIVE_CHUNKS + chunk_id

    @staticmethod
    def live_reservations_applied(chunk_id: str) -> str:
        return Keys.LIVE_RESERVATIONS_APPLIED + chunk_id

    @staticmethod
    def volume(volume_id: str) -> str:
        return Keys.VOLUMES + volume_id

    @staticmethod
    def volume_name(name: str) -> str:
        return Keys.VOLUME_NAMES + name

    @staticmethod
    def lun(target: int, lun: int) -> str:
        # Zero-padded so that etcd's byte order is numeric order.
        return f"{Keys.LUNS}{target:04d}/{lun:03d}"

    @staticmethod
    def parse_lun(key: str) -> tuple[int, int]:
        """(target, lun) from a LUN map key; ValueError if it is not one."""
        target, _, lun = key.removeprefix(Keys.LUNS).partition("/")
        return int(target), int(lun)

    @staticmethod
    def target(target: int) -> str:
        return f"{Keys.TARGETS}{target:04d}"

    @staticmethod
    def snapshot(snapshot_id: str) -> str:
        return Keys.SNAPSHOTS + snapshot_id

    @staticmethod
    def snapshot_name(name: str) -> str:
        return Keys.SNAPSHOT_NAMES + name

    @staticmethod
    def chunk_admin(chunk_id: str) -> str:
        return Keys.CHUNK_ADMIN + chunk_id

    @staticmethod
    def extent(volume_id: str, index: int) -> str:
        """The key of the layout before pages (one record per extent): still read, and
        moved into its page on the extent's next change (common/extent_pages.py)."""
        # Zero-padded so that etcd's byte order is extent order.
        return f"{Keys.EXTENTS}{volume_id}/{index:08d}"

    @staticmethod
    def volume_extents(volume_id: str) -> str:
        return f"{Keys.EXTENTS}{volume_id}/"

    @staticmethod
    def parse_extent(key: str) -> tuple[str, int]:
        """(volume id, extent index) from an extent map key; ValueError if it is not one."""
        volume, sep, index = key.removeprefix(Keys.EXTENTS).rpartition("/")
        if not sep or not volume or not index.isdigit():
            raise ValueError(f"not an extent key: {key!r}")
        return volume, int(index)

    @staticmethod
    def target_port(number: int) -> str:
        return f"{Keys.TARGET_PORTS}{number:05d}"

    @staticmethod
    def ring(replicas: int) -> str:
        return f"{Keys.RINGS}{replicas}"

    @staticmethod
    def scrub_errors(chunk_id: str) -> str:
        return Keys.SCRUB_ERRORS + chunk_id

    @staticmethod
    def rebalance_move(volume_id: str, index: int) -> str:
        return f"{Keys.REBALANCE}{volume_id}/{index:08d}"

    @staticmethod
    def locality_claim(volume_id: str, index: int) -> str:
        return f"{Keys.LOCALITY}{volume_id}/{index:08d}"

    @staticmethod
    def chunk_extents(chunk_id: str) -> str:
        return f"{Keys.CHUNK_EXTENTS}{chunk_id}/"

    @staticmethod
    def operation(operation_id: str) -> str:
        return Keys.OPERATIONS + operation_id

    @staticmethod
    def gc_volume(volume_id: str) -> str:
        return Keys.GC_VOLUMES + volume_id

    @staticmethod
    def gc_snapshot(snapshot_id: str) -> str:
        return Keys.GC_SNAPSHOTS + snapshot_id

    @staticmethod
    def gc_replica(chunk_id: str, store_volume: str, index: int) -> str:
        return f"{Keys.GC_REPLICAS}{chunk_id}/{store_volume}/{index:08d}"

    @staticmethod
    def gc_replicas(chunk_id: str) -> str:
        return f"{Keys.GC_REPLICAS}{chunk_id}/"

    @staticmethod
    def live_seen(chunk_id: str) -> str:
        return Keys.LIVE_SEEN + chunk_id


def preserved_volume(volume_id: str, epoch: int) -> str:
    """The extent-map volume name of a volume's extents preserved for snapshots: the copy of
    extent i made when data written in `epoch` was first overwritten lives at
    `Keys.extent(preserved_volume(v, epoch), i)` (docs/snapshots.md)."""
    return f"{volume_id}.e{epoch}"


def parse_preserved(name: str) -> tuple[str, int] | None:
    """(volume id, epoch) of a preserved-copy name, None for a volume's own extents."""
    base, sep, epoch = name.rpartition(".e")
    if not sep or not base or not epoch.isdigit():
        return None
    return base, int(epoch)


T = TypeVar("T")


def of_volume(per_volume: Mapping[str, T], volume: str) -> T | None:
    """`per_volume`'s entry for an extent-map volume: its own, or for a snapshot's preserved
    copy (`<volume>.e<epoch>`) that of the volume it was taken of."""
    found = per_volume.get(volume)
    if found is None and (kept := parse_preserved(volume)) is not None:
        found = per_volume.get(kept[0])
    return found


# Targets and LUNs (docs/etcd-schema.md, "LUN assignment").
TARGET_IQN_PREFIX = "iqn.2026-11.io.lunastor:tgt-"
MAX_TARGETS = 4096
FIRST_LUN = 1  # LUN 0 is never assigned: every initiator sees it as "not connected"
MAX_LUN = 255  # so a target holds LUNs 1..255: 255 volumes


def target_iqn(target: int) -> str:
    return f"{TARGET_IQN_PREFIX}{target}"


@dataclass(frozen=True)
class _Fields:
    """A record class's fields, looked up once: `dataclasses.fields` is ~2 us a call, a
    fifth of decoding a volume record (meta decodes 10,000 to list them cold)."""

    names: tuple[str, ...]
    known: frozenset[str]
    values: Callable[[Any], tuple[Any, ...]]  # one getter of all their values, as a tuple


_FIELDS: dict[type, _Fields] = {}


def _fields_of(cls: type) -> _Fields:
    fields = _FIELDS.get(cls)
    if fields is None:
        names = tuple(f.name for f in dataclasses.fields(cls))
        fields = _FIELDS[cls] = _Fields(names, frozenset(names), _values_getter(names))
    return fields


def _nested(value: object) -> object:
    """JSON for a value json cannot encode itself: a nested record (a dataclass), as
    `dataclasses.asdict` gives it; anything else is an error, as before."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _values_getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """A function giving the values of attributes `names` of its argument, as a tuple."""
    if len(names) == 1:  # attrgetter of one name returns the value itself
        one = operator.attrgetter(names[0])
        return lambda obj: (one(obj),)
    if not names:
        return lambda obj: ()
    return operator.attrgetter(*names)


_RECORD_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True, default=_nested)


@dataclass
class Record:
    """Base for JSON records with a format version."""

    VERSION: ClassVar[int] = 1
    ACCEPTS: ClassVar[tuple[int, ...]] = (1,)

    def to_json(self) -> bytes:
        # The fields as they are, nested records through `_nested`: the same JSON as from
        # `dataclasses.asdict`, without its deep copy of every value (~half of this call's
        # CPU; meta writes 2-3 records per REST call, docs/scale.md), and through one encoder:
        # `json.dumps` with arguments builds a new one per call, most of the cost of a small
        # record (a LunRecord: 13.5 -> 2.6 us).
        fields = _fields_of(type(self))
        body = {"v": self.VERSION}
        body.update(zip(fields.names, fields.values(self), strict=True))
        return _RECORD_ENCODER.encode(body).encode()

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
        known = _fields_of(cls).known
        if not known.issuperset(data):  # fields a newer writer added: left out
            data = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**data)
        except TypeError as exc:
            raise RecordError(f"{cls.__name__}: {exc}") from None


@dataclass
class DataDirCapacity:
    path: str
    capacity: int  # bytes the file system holds
    free: int  # bytes available to lunastor
    state: str = "ok"  # ok | failed (taken out of service: IO errors, unmounted, removed)
    error: str = ""  # why it failed
    used: int = 0  # bytes lunastor's replicas occupy there (allocated blocks)


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
    # its `replace_after`: how long its repair loop waits for a lost member to come back
    # before replacing it (0: not said); meta's volume health mirrors that wait
    replace_after: float = 0.0
    # a server of several worker processes (lunastor/chunk/workers.py): each worker's data
    # address, by worker index (worker 0's is `data_address`); empty: one worker
    data_workers: list[str] = field(default_factory=list)

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


@dataclass
class VolumeRecord(Record):
    """One volume. Its name is unique through `Keys.volume_name`; its (target, lun) through
    `Keys.lun`; all three keys are written in the one transaction that creates it."""

    id: str = ""
    name: str = ""
    size_bytes: int = 0
    replicas: int = 3
    block_size: int = 512
    labels: dict[str, str] = field(default_factory=dict)
    source: dict[str, str] | None = None  # {"snapshot_id": ...} or {"volume_id": ...}
    state: str = "available"
    created_at: float = 0.0
    target: int = 0
    lun: int = 0
    # Snapshots (docs/snapshots.md): the epoch writes now land in (a snapshot freezes it and
    # bumps it), and where a clone reads extents it has not written yet: a chain of
    # {"volume": id, "epoch": e}, nearest first.
    epoch: int = 0
    base: list[dict[str, Any]] = field(default_factory=list)
    # CSI topology: the zones its extents are placed in (chunk servers' `zone`); [] = any
    zones: list[str] = field(default_factory=list)
    # Per-volume QoS limits (`lunastor.common.qos.QosLimits.to_dict()`); {} = unlimited
    qos: dict[str, Any] = field(default_factory=dict)

    @property
    def target_iqn(self) -> str:
        return target_iqn(self.target)


@dataclass
class LunRecord(Record):
    """One entry of the LUN map: the volume behind (target, lun) and who may see it (ACL)."""

    volume_id: str = ""
    initiators: list[str] = field(default_factory=list)  # sorted initiator IQNs


@dataclass
class ChapRecord(Record):
    """CHAP credentials; secrets are sealed (`lunastor.common.sealing`), never plain text."""

    user: str = ""
    secret: str = ""  # sealed
    mutual_user: str = ""
    mutual_secret: str = ""  # sealed; empty when mutual CHAP is off
    updated_at: float = 0.0


@dataclass
class TargetRecord(Record):
    """Per-target settings; a target without one has CHAP off."""

    target: int = 0
    chap: dict[str, Any] | None = None  # ChapRecord fields, sealed secrets


@dataclass
class SnapshotRecord(Record):
    id: str = ""
    name: str = ""
    source_volume_id: str = ""
    size_bytes: int = 0
    block_size: int = 512
    created_at: float = 0.0
    ready_to_use: bool = True
    epoch: int = 0  # the source volume's epoch this snapshot froze
    base: list[dict[str, Any]] = field(default_factory=list)  # the source's base chain then


@dataclass
class ChunkAdminRecord(Record):
    """The operator's intent for a chunk server: drain it (move everything off)."""

    id: str = ""
    state: str = "draining"  # draining | drained
    requested_at: float = 0.0
    operation_id: str = ""


@dataclass
class PlannedStop(Record):
    """A chunk server that is not ready on purpose and is expected back by `until` (wall
    clock): written by a server stopping cleanly (SIGTERM) before its live record goes, and
    by a server starting before its data path is up; deleted once its data path serves.
    While it holds, the others wait for the server instead of failing its extents over or
    removing it (docs/faults.md, "Planned restarts"); once `until` passed it is ignored."""

    id: str = ""
    reason: str = "stopping"  # stopping | starting
    at: float = 0.0  # when it was written (wall clock)
    until: float = 0.0


@dataclass
class OperationRecord(Record):
    """A long-running job with progress (drain today; rebuilds and rebalances later)."""

    id: str = ""
    kind: str = ""
    subject: str = ""  # what it works on, e.g. a chunk server id
    state: str = "running"  # running | succeeded | failed
    progress: float = 0.0  # 0..1
    created_at: float = 0.0
    updated_at: float = 0.0
    detail: str = ""
    total: int = 0  # work items (extents) counted when it started; progress is their share


@dataclass
class ScrubErrorsRecord(Record):
    """The blocks a chunk server's scrub found failing their checksum and could not repair
    from a good member (`Keys.scrub_errors`), as of its latest pass; no key when none. Read
    by meta into a volume's status and its CSI volume condition."""

    chunk_id: str = ""
    at: float = 0.0  # when the pass that found them ended (or is still running)
    blocks: list[list[Any]] = field(default_factory=list)  # [volume, extent index, block]
    more: int = 0  # bad blocks beyond those listed (the list is capped)


@dataclass
class MoveRecord(Record):
    """A rebalancing move (`Keys.rebalance_move`): the extent's primary joins `target`, then
    retires `source` (docs/placement.md, "Rebalancing"). Written and deleted by meta's
    planner; the chunk servers only read it."""

    volume: str = ""
    index: int = 0
    source: str = ""
    target: str = ""
    operation_id: str = ""
    created_at: float = 0.0


@dataclass
class LocalityClaim(Record):
    """An access point asks for an extent's primary (`Keys.locality_claim`,
    docs/datapath.md "Locality"): it keeps doing IO on the extent. The extent's primary
    makes `chunk` a member (join, then retire another) and hands the primary over to it.
    Written by access points, read by the primaries' repair loops and meta's rebalance
    planner (which never moves the claimant's replica away). `since` (wall clock) and `hold`
    (seconds) are the hysteresis: another access point may take the claim over only after
    `since + hold`, and a contested claim doubles `hold`."""

    volume: str = ""
    index: int = 0
    chunk: str = ""
    since: float = 0.0
    hold: float = 0.0
    contests: int = 0


@dataclass
class ClusterConfigRecord(Record):
    """Cluster-wide settings every chunk server must agree on. Created once, if absent, by
    the first chunk server that starts (from its own configuration); the stored value wins."""

    extent_size: int = 64 * 1024 * 1024


@dataclass
class ExtentRecord(Record):
    """One extent map entry (`Keys.extent`): who holds the extent, and its generation.

    `replicas[0]` is the primary. Every change of `replicas` (or of the primary) bumps `gen`,
    in one transaction that compares the key's mod_revision. `converging`: a new primary was
    chosen after a failure and the survivors are being made identical; until it is cleared,
    the primary accepts no writes (reads of the primary are fine: it holds the newest data).
    """

    volume: str = ""
    index: int = 0
    gen: int = 1
    replicas: list[str] = field(default_factory=list)
    epoch: int = 0  # snapshot epoch the data was written in (issue 6)
    converging: bool = False
    # A preserved copy (docs/snapshots.md) holds the data of epochs [epoch, until).
    until: int = 0
    # A clone's extent is created as a local copy of this extent (a store volume name) on
    # every member, instead of empty.
    origin: str = ""
    # the volume's replica count when the extent was allocated (0: not recorded); a volume
    # made with fewer copies than the chunk servers' min_replicas is written with all it has
    copies: int = 0
    # Former members that may still hold files of this extent: a member removed while it was
    # down (failover, repair) keeps its replica files. The GC hands them work too when it
    # frees the extent; a stray that rejoins is a member again. Kept by the extent map's
    # transactions (common/extent_pages.py), never by callers.
    strays: list[str] = field(default_factory=list)

    @property
    def primary(self) -> str:
        return self.replicas[0] if self.replicas else ""
