"""Every metadata change the API makes, each one etcd transaction guarded by revisions.

The pattern throughout: read what the change depends on (remembering each key's
mod_revision, or that it is absent), decide, then commit in one `txn` whose compares say
"nothing I read has changed". If another writer got there first the compares fail and the
loop reads again, so there is no read-modify-write race. After `MAX_ATTEMPTS` lost races the
call gives up with 409 `aborted` (CSI ABORTED: retry later).

Errors are `Problem`s with the stable codes listed in docs/csi-mapping.md.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from lunastor.common.etcd import (
    Compare,
    Delete,
    Etcd,
    EtcdCompacted,
    EtcdFutureRevision,
    Get,
    KeyValue,
    Put,
)
from lunastor.common.qos import QosError, QosLimits
from lunastor.common.records import (
    Keys,
    LunRecord,
    Record,
    SnapshotRecord,
    VolumeRecord,
)
from lunastor.meta.fence import wait_data_path
from lunastor.meta.luns import LunMap
from lunastor.meta.problems import Problem
from lunastor.meta.schemas import MAX_INITIATORS_PER_LUN

R = TypeVar("R", bound=Record)

MAX_ATTEMPTS = 64


def new_id(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(8)}"


def aborted(what: str) -> Problem:
    return Problem(409, "aborted", f"{what}: lost too many races with concurrent changes; retry")


# --- pagination tokens ---------------------------------------------------------------------------

_TOKEN_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def encode_token(revision: int, last_id: str) -> str:
    """Opaque `next` token: the revision the listing is pinned to and the last id returned."""
    raw = json.dumps([revision, last_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> tuple[int, str]:
    def bad() -> Problem:
        return Problem(400, "invalid_field", "next: not a token this API issued", field="next")

    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        revision, last_id = json.loads(raw)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise bad() from None
    if (
        not isinstance(revision, int)
        or isinstance(revision, bool)
        or revision <= 0
        or not isinstance(last_id, str)
        or not _TOKEN_ID.fullmatch(last_id)
    ):
        raise bad()
    return revision, last_id


# One compact encoder for every JSON body and view meta writes: `json.dumps` with arguments
# builds a new encoder on every call.
_JSON = json.JSONEncoder(separators=(",", ":"))


def json_bytes(value: Any) -> bytes:
    """`value` as compact JSON (the API's response bodies and cached views)."""
    return _JSON.encode(value).encode()


def lun_target_prefix(target: int) -> str:
    """The prefix of `target`'s LUN map keys (`Keys.lun` without the LUN)."""
    return Keys.lun(target, 0).rpartition("/")[0] + "/"


# --- record helpers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Versioned:
    """A record as read, with the mod_revision the commit must still find (0: absent)."""

    key: str
    mod_revision: int

    @property
    def unchanged(self) -> Compare:
        return Compare.mod_revision(self.key) == self.mod_revision


async def read(etcd: Etcd, key: str, cls: type[R]) -> tuple[R | None, Versioned]:
    kv = await etcd.get(key)
    if kv is None:
        return None, Versioned(key, 0)
    return cls.from_json(kv.value), Versioned(key, kv.mod_revision)


@dataclass(frozen=True)
class Listing:
    """One page of a listing; `items` are already JSON (see `ViewCache`)."""

    items: list[bytes]
    next: str | None
    revision: int

    def body(self) -> bytes:
        return b"".join(
            (
                b'{"items":[',
                b",".join(self.items),
                b'],"next":',
                json.dumps(self.next).encode(),
                b',"revision":',
                str(self.revision).encode(),
                b"}",
            )
        )


class ViewCache:
    """JSON views of records by (key, mod_revision).

    A record cannot change without its mod_revision changing, so a cached view is never
    stale; listing 10,000 volumes then costs the etcd range and a join, not 10,000 decodes
    and encodes. Bounded; the oldest entries go first.
    """

    def __init__(self, render: Callable[[bytes], dict[str, Any]], size: int = 100_000) -> None:
        self.render = render
        self.size = size
        self._views: dict[tuple[str, int], bytes] = {}

    def add(self, key: str, mod_revision: int, view: dict[str, Any]) -> None:
        """Remember the view of a record this instance just wrote at `mod_revision`."""
        if len(self._views) >= self.size:
            del self._views[next(iter(self._views))]
        self._views[(key, mod_revision)] = json_bytes(view)

    def get(self, key: str, mod_revision: int) -> bytes | None:
        """The view of `key` at `mod_revision`, if cached."""
        return self._views.get((key, mod_revision))

    def __call__(self, kv: KeyValue) -> bytes:
        key = (kv.key, kv.mod_revision)
        view = self._views.get(key)
        if view is None:
            view = json_bytes(self.render(kv.value))
            if len(self._views) >= self.size:
                del self._views[next(iter(self._views))]
            self._views[key] = view
        return view


def as_json(
    render: Callable[[KeyValue], dict[str, Any] | None],
) -> Callable[[KeyValue], bytes | None]:
    def encoded(kv: KeyValue) -> bytes | None:
        view = render(kv)
        return None if view is None else json_bytes(view)

    return encoded


async def list_page(
    etcd: Etcd,
    prefix: str,
    limit: int,
    token: str | None,
    render: Callable[[KeyValue], bytes | None],
) -> Listing:
    """One page of `prefix`, pinned to one etcd revision across pages by the token.

    `render` returns None for keys to leave out (filters); the page then reads on until it has
    `limit` items or the prefix ends.
    """
    revision: int | None = None
    after: str | None = None
    if token:
        revision, last_id = decode_token(token)
        after = prefix + last_id
    items: list[bytes] = []
    last_key: str | None = None
    more = True
    while more and len(items) < limit:
        try:
            page = await etcd.get_page(prefix, after, limit, revision)
        except EtcdCompacted:
            raise Problem(
                410, "token_expired", "next: the listing's revision was compacted; list again"
            ) from None
        except EtcdFutureRevision:
            raise Problem(400, "invalid_field", "next: unknown revision", field="next") from None
        revision = page.revision
        more = page.more
        for kv in page.kvs:
            last_key = kv.key
            item = render(kv)
            if item is not None:
                items.append(item)
                if len(items) == limit:
                    more = more or kv is not page.kvs[-1]
                    break
        after = last_key
    assert revision is not None
    next_token = None
    if more and last_key:
        next_token = encode_token(revision, last_key.removeprefix(prefix))
    return Listing(items, next_token, revision)


def qos_limits(make: Callable[[dict[str, Any]], QosLimits], raw: dict[str, Any]) -> QosLimits:
    """`make(raw)`, its QosError as a 400 naming the field (`qos.<field>`)."""
    try:
        return make(raw)
    except QosError as exc:
        raise Problem(400, "invalid_field", f"qos.{exc}", field=f"qos.{exc.field}") from None


# --- views ------------------------------------------------------------------------------------


def volume_view(v: VolumeRecord) -> dict[str, Any]:
    return {
        "id": v.id,
        "name": v.name,
        "size_bytes": v.size_bytes,
        "replicas": v.replicas,
        "block_size": v.block_size,
        "labels": v.labels,
        "source": v.source,
        "state": v.state,
        "created_at": v.created_at,
        "target_iqn": v.target_iqn,
        "lun": v.lun,
        "zones": v.zones,
        "qos": v.qos,
    }


def snapshot_view(s: SnapshotRecord) -> dict[str, Any]:
    return {
        "id": s.id,
        "name": s.name,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "created_at": s.created_at,
        "ready_to_use": s.ready_to_use,
    }


@dataclass(frozen=True)
class CloneSource:
    """What creating a volume from a source adds to the create transaction."""

    compares: list[Compare]
    puts: list[Put]
    size: int
    block_size: int
    base: list[dict[str, Any]]


@dataclass(frozen=True)
class VolumeSpec:
    """What a create asks for; two creates with the same name must ask for the same thing."""

    name: str
    size_bytes: int
    replicas: int = 3
    block_size: int = 512
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    source: dict[str, str] | None = None
    zones: list[str] = dataclasses.field(default_factory=list)
    # QoS limits are set at creation but change online (PATCH, CSI ModifyVolume): a repeated
    # create is not a conflict for them (docs/qos.md)
    qos: dict[str, Any] = dataclasses.field(default_factory=dict)

    def differences(self, v: VolumeRecord) -> list[str]:
        mine = dataclasses.asdict(self)
        del mine["qos"]
        theirs = {k: getattr(v, k) for k in mine}
        return sorted(k for k in mine if mine[k] != theirs[k])


VolumeAndLun = tuple[VolumeRecord | None, Versioned, LunRecord | None, Versioned]
KNOWN_MAX = 10_000  # volumes whose last committed state an instance keeps (`Store._known`)


class Store:
    """Volumes, exports and snapshots: the transactions behind the CSI-facing API."""

    def __init__(self, etcd: Etcd, luns: LunMap, portal: str) -> None:
        self.etcd = etcd
        self.luns = luns
        self.portal = portal
        self._slots: dict[str, tuple[int, int]] = {}  # volume id -> (target, lun)
        # The volume and LUN records as this instance last committed them, with their
        # mod_revisions: a publish, unpublish or delete that follows one of ours (a CSI
        # create+publish, unpublish+delete) commits against them without reading first. Its
        # compares decide: on a failed one, or when the cached state would not end in a
        # commit, it reads etcd as always (`_state`).
        self._known: dict[str, VolumeAndLun] = {}
        self._volume_views = ViewCache(lambda raw: volume_view(VolumeRecord.from_json(raw)))

    # --- volumes --------------------------------------------------------------------------

    async def get_volume(self, volume_id: str) -> VolumeRecord:
        volume, _ = await read(self.etcd, Keys.volume(volume_id), VolumeRecord)
        if volume is None:
            raise Problem(404, "volume_not_found", f"no volume {volume_id}")
        return volume

    def volume_json(self, volume: VolumeRecord) -> bytes:
        """`volume_view(volume)` as JSON. A volume this instance just committed was encoded
        for the listing cache then (`create_volume`): a create's answer is not encoded twice."""
        known = self._known.get(volume.id)
        if known is not None and known[0] is volume:
            cached = self._volume_views.get(known[1].key, known[1].mod_revision)
            if cached is not None:
                return cached
        return json_bytes(volume_view(volume))

    async def find_volume(self, name: str) -> VolumeRecord | None:
        kv = await self.etcd.get(Keys.volume_name(name))
        if kv is None:
            return None
        volume, _ = await read(self.etcd, Keys.volume(kv.value.decode()), VolumeRecord)
        return volume

    async def list_volumes(self, limit: int, token: str | None) -> Listing:
        return await list_page(self.etcd, Keys.VOLUMES, limit, token, self._volume_views)

    async def _source(self, spec: VolumeSpec) -> CloneSource:
        """Compares that pin the clone source, its size and block size, and the clone's base
        chain (docs/snapshots.md). A clone of a volume takes an implicit snapshot: the
        source's epoch is bumped in the same transaction."""
        if spec.source is None:
            return CloneSource([], [], 0, spec.block_size, [])
        if "snapshot_id" in spec.source:
            sid = spec.source["snapshot_id"]
            snap, sv = await read(self.etcd, Keys.snapshot(sid), SnapshotRecord)
            if snap is None:
                raise Problem(404, "source_not_found", f"source snapshot {sid} does not exist")
            base = [{"volume": snap.source_volume_id, "epoch": snap.epoch}, *snap.base]
            return CloneSource([sv.unchanged], [], snap.size_bytes, snap.block_size, base)
        vid = spec.source["volume_id"]
        vol, vv = await read(self.etcd, Keys.volume(vid), VolumeRecord)
        if vol is None:
            raise Problem(404, "source_not_found", f"source volume {vid} does not exist")
        base = [{"volume": vol.id, "epoch": vol.epoch}, *vol.base]
        bumped = dataclasses.replace(vol, epoch=vol.epoch + 1)
        return CloneSource(
            [vv.unchanged], [Put(vv.key, bumped.to_json())], vol.size_bytes, vol.block_size, base
        )

    def _check_spec(self, spec: VolumeSpec) -> None:
        if spec.qos:  # no limits (most creates) cannot be wrong
            qos_limits(QosLimits.from_dict, spec.qos)
        if spec.size_bytes % spec.block_size:
            raise Problem(
                400,
                "invalid_field",
                f"size_bytes: must be a multiple of block_size ({spec.block_size})",
                field="size_bytes",
            )

    def _same(self, existing: VolumeRecord, spec: VolumeSpec) -> VolumeRecord:
        diff = spec.differences(existing)
        if diff:
            raise Problem(
                409,
                "already_exists_with_different_parameters",
                f"volume {spec.name!r} exists ({existing.id}) with other {', '.join(diff)}",
                volume_id=existing.id,
            )
        return existing

    async def create_volume(self, spec: VolumeSpec) -> tuple[VolumeRecord, bool]:
        """The volume named `spec.name`, and whether this call created it.

        One transaction writes the volume, its name index entry and its LUN map entry; the
        compares make the name and the (target, lun) unique even across meta instances.
        """
        self._check_spec(spec)
        name_key = Keys.volume_name(spec.name)
        avoid: set[tuple[int, int]] = set()
        for _ in range(MAX_ATTEMPTS):
            if spec.source is not None:
                # A retried clone must find its volume even if the source is gone by now.
                existing = await self.find_volume(spec.name)
                if existing is not None:
                    same = self._same(existing, spec)
                    if "volume_id" in spec.source:  # the first call may have failed waiting
                        await wait_data_path(self.etcd, await self._created(Keys.volume(same.id)))
                    return same, False
            src = await self._source(spec)
            source_compares, source_size, source_block = src.compares, src.size, src.block_size
            if spec.source is not None:
                if spec.block_size != source_block:
                    raise Problem(
                        400,
                        "invalid_field",
                        f"block_size: the source has block size {source_block}",
                        field="block_size",
                    )
                if spec.size_bytes < source_size:
                    raise Problem(
                        400,
                        "out_of_range",
                        f"size_bytes: smaller than the source ({source_size} bytes)",
                        field="size_bytes",
                    )
            slot = self.luns.reserve(avoid)
            if slot is None:
                raise Problem(507, "luns_exhausted", "every target's LUNs are in use")
            volume = VolumeRecord(
                id=new_id("vol"),
                name=spec.name,
                size_bytes=spec.size_bytes,
                replicas=spec.replicas,
                block_size=spec.block_size,
                labels=dict(spec.labels),
                source=dict(spec.source) if spec.source else None,
                created_at=round(time.time(), 6),
                target=slot[0],
                lun=slot[1],
                base=src.base,
                zones=list(spec.zones),
                qos=dict(spec.qos),
            )
            lun_key = Keys.lun(*slot)
            taken = False
            try:
                result = await self.etcd.txn(
                    [
                        Compare.version(name_key) == 0,
                        Compare.version(lun_key) == 0,
                        *source_compares,
                    ],
                    [
                        Put(Keys.volume(volume.id), volume.to_json()),
                        Put(name_key, volume.id.encode()),
                        Put(lun_key, LunRecord(volume_id=volume.id).to_json()),
                        *src.puts,
                    ],
                    # On failure: who has the name, and the slot's whole target, so that
                    # LUNs other instances created are learnt at once (`LunMap.learn`)
                    [Get(name_key), Get(lun_target_prefix(slot[0]), prefix=True)],
                )
                if result.succeeded:
                    taken = True
                    if src.puts:  # a clone of a volume: its writes must now copy first
                        await wait_data_path(self.etcd, result.revision)
                    self._volume_views.add(
                        Keys.volume(volume.id), result.revision, volume_view(volume)
                    )
                    self._remember_slot(volume)
                    written = Versioned(Keys.volume(volume.id), result.revision)
                    lun_rec = LunRecord(volume_id=volume.id)
                    self._know(volume, written, lun_rec, Versioned(lun_key, result.revision))
                    return volume, True
                named, target_luns = result.responses
                assert isinstance(target_luns, list)
                if target_luns:
                    self.luns.learn([kv.key for kv in target_luns])
                if any(kv.key == lun_key for kv in target_luns):
                    taken = True
                    avoid.add(slot)
            finally:
                self.luns.release(slot, taken)
            if named:
                assert isinstance(named, list)
                existing, _ = await read(
                    self.etcd, Keys.volume(named[0].value.decode()), VolumeRecord
                )
                if existing is not None:
                    return self._same(existing, spec), False
        raise aborted(f"create volume {spec.name!r}")

    async def delete_volume(self, volume_id: str, force: bool) -> None:
        """Delete a volume; refused while it is exported unless `force`. Missing: done."""
        for attempt in range(MAX_ATTEMPTS + 1):
            (volume, vv, lun, lv), cached = await self._state(volume_id, attempt)
            if cached and (lun is None or (lun.initiators and not force)):
                continue  # not a plain delete: decided on what etcd holds
            if volume is None:
                return
            lun_key = Keys.lun(volume.target, volume.lun)
            ours = lun is not None
            if lun is not None and lun.initiators and not force:
                raise Problem(
                    409,
                    "volume_in_use",
                    f"volume {volume_id} is exported to {', '.join(lun.initiators)}; "
                    "unpublish it first or delete with force=true",
                )
            name_key = Keys.volume_name(volume.name)
            ops: list[Put | Delete | Get] = [
                Delete(Keys.volume(volume_id)),
                Delete(name_key),
                # The extents are freed in the background by the garbage collector.
                Put(Keys.gc_volume(volume_id), volume.to_json()),
            ]
            if ours:
                ops.append(Delete(lun_key))
            result = await self.etcd.txn(
                [vv.unchanged, lv.unchanged, Compare.value(name_key) == volume_id.encode()], ops
            )
            if result.succeeded:
                self._slots.pop(volume_id, None)
                if ours:
                    self.luns.forget((volume.target, volume.lun))
                return
        raise aborted(f"delete volume {volume_id}")

    async def expand_volume(self, volume_id: str, size_bytes: int) -> VolumeRecord:
        for _ in range(MAX_ATTEMPTS):
            volume, vv = await read(self.etcd, Keys.volume(volume_id), VolumeRecord)
            if volume is None:
                raise Problem(404, "volume_not_found", f"no volume {volume_id}")
            if size_bytes % volume.block_size:
                raise Problem(
                    400,
                    "invalid_field",
                    f"size_bytes: must be a multiple of the block size ({volume.block_size})",
                    field="size_bytes",
                )
            if size_bytes < volume.size_bytes:
                raise Problem(
                    400,
                    "shrink_not_supported",
                    f"size_bytes: {size_bytes} is smaller than the volume "
                    f"({volume.size_bytes}); volumes only grow",
                    field="size_bytes",
                )
            if size_bytes == volume.size_bytes:
                return volume
            grown = dataclasses.replace(volume, size_bytes=size_bytes)
            result = await self.etcd.txn([vv.unchanged], [Put(vv.key, grown.to_json())])
            if result.succeeded:
                return grown
        raise aborted(f"expand volume {volume_id}")

    async def set_qos(self, volume_id: str, changes: dict[str, Any]) -> VolumeRecord:
        """Change a volume's QoS limits online (`QosLimits.merged`: a field set to 0 or None
        clears it); every access point applies them as soon as it sees the record."""
        for _ in range(MAX_ATTEMPTS):
            volume, vv = await read(self.etcd, Keys.volume(volume_id), VolumeRecord)
            if volume is None:
                raise Problem(404, "volume_not_found", f"no volume {volume_id}")
            limits = qos_limits(QosLimits.from_dict(volume.qos).merged, changes)
            if limits.to_dict() == volume.qos:
                return volume
            changed = dataclasses.replace(volume, qos=limits.to_dict())
            result = await self.etcd.txn([vv.unchanged], [Put(vv.key, changed.to_json())])
            if result.succeeded:
                return changed
        raise aborted(f"set QoS of volume {volume_id}")

    # --- exports (the LUN's ACL) ----------------------------------------------------------

    def export_view(self, volume: VolumeRecord, initiator: str) -> dict[str, Any]:
        return {
            "volume_id": volume.id,
            "initiator": initiator,
            "portal": self.portal,
            "target_iqn": volume.target_iqn,
            "lun": volume.lun,
        }

    async def _volume_and_lun(
        self, volume_id: str
    ) -> tuple[VolumeRecord | None, Versioned, LunRecord | None, Versioned]:
        """The volume and its LUN record (None if it is not this volume's), as one read when
        the volume's (target, lun) is known: it never changes in a volume's life."""
        vkey = Keys.volume(volume_id)
        slot = self._slots.get(volume_id)
        if slot is None:
            volume, vv = await read(self.etcd, vkey, VolumeRecord)
            if volume is None:
                return None, vv, None, Versioned("", 0)
            self._remember_slot(volume)
            lun, lv = await read(self.etcd, Keys.lun(volume.target, volume.lun), LunRecord)
        else:
            lkey = Keys.lun(*slot)
            got = (await self.etcd.txn([], [Get(vkey), Get(lkey)])).responses
            vkvs, lkvs = got[0], got[1]
            assert isinstance(vkvs, list) and isinstance(lkvs, list)
            if not vkvs:
                self._slots.pop(volume_id, None)
                return None, Versioned(vkey, 0), None, Versioned("", 0)
            volume, vv = (
                VolumeRecord.from_json(vkvs[0].value),
                Versioned(vkey, vkvs[0].mod_revision),
            )
            lun = LunRecord.from_json(lkvs[0].value) if lkvs else None
            lv = Versioned(lkey, lkvs[0].mod_revision if lkvs else 0)
        if lun is not None and lun.volume_id != volume_id:
            lun = None
        return volume, vv, lun, lv

    async def _state(self, volume_id: str, attempt: int) -> tuple[VolumeAndLun, bool]:
        """The volume and its LUN, and whether they come from `_known` (only on a first
        attempt: a retry follows a failed compare, so it reads etcd)."""
        if attempt == 0:
            known = self._known.pop(volume_id, None)
            if known is not None:
                return known, True
        return await self._volume_and_lun(volume_id), False

    def _know(self, volume: VolumeRecord, vv: Versioned, lun: LunRecord, lv: Versioned) -> None:
        """Remember the state this instance just committed (`_known`)."""
        self._known.pop(volume.id, None)
        if len(self._known) >= KNOWN_MAX:
            del self._known[next(iter(self._known))]
        self._known[volume.id] = (volume, vv, lun, lv)

    def _remember_slot(self, volume: VolumeRecord) -> None:
        if len(self._slots) >= 100_000:
            del self._slots[next(iter(self._slots))]
        self._slots[volume.id] = (volume.target, volume.lun)

    async def add_export(
        self, volume_id: str, initiator: str, exclusive: bool = False
    ) -> tuple[dict[str, Any], bool]:
        """Let `initiator` see the volume's LUN; publishing twice gives the same answer.

        `exclusive`: only if no other initiator sees it (CSI single-node access modes), decided
        in the same transaction, so two concurrent publishes to two nodes cannot both win."""
        initiator = initiator.lower()
        for attempt in range(MAX_ATTEMPTS + 1):
            (volume, vv, lun, lv), cached = await self._state(volume_id, attempt)
            if cached and (
                lun is None
                or initiator in lun.initiators
                or (exclusive and lun.initiators)
                or len(lun.initiators) >= MAX_INITIATORS_PER_LUN
            ):
                continue  # not a plain add: decided on what etcd holds
            if volume is None:
                raise Problem(404, "volume_not_found", f"no volume {volume_id}")
            if lun is None:
                raise Problem(409, "aborted", f"volume {volume_id} is being deleted")
            if initiator in lun.initiators:
                return self.export_view(volume, initiator), False
            if exclusive and lun.initiators:
                raise Problem(
                    409,
                    "volume_in_use",
                    f"volume {volume_id} is exported to {', '.join(lun.initiators)}; "
                    "an exclusive export needs it exported nowhere else",
                )
            if len(lun.initiators) >= MAX_INITIATORS_PER_LUN:
                raise Problem(
                    507,
                    "too_many_exports",
                    f"volume {volume_id} is exported to {MAX_INITIATORS_PER_LUN} initiators",
                )
            acl = LunRecord(volume_id=volume_id, initiators=sorted([*lun.initiators, initiator]))
            result = await self.etcd.txn([vv.unchanged, lv.unchanged], [Put(lv.key, acl.to_json())])
            if result.succeeded:
                self._know(volume, vv, acl, Versioned(lv.key, result.revision))
                return self.export_view(volume, initiator), True
        raise aborted(f"export volume {volume_id}")

    async def remove_export(self, volume_id: str, initiator: str) -> None:
        initiator = initiator.lower()
        for attempt in range(MAX_ATTEMPTS + 1):
            (volume, vv, lun, lv), cached = await self._state(volume_id, attempt)
            if volume is None or lun is None or initiator not in lun.initiators:
                if cached:
                    continue  # nothing to do, as this instance last saw it: check etcd
                return
            acl = LunRecord(
                volume_id=volume_id, initiators=[i for i in lun.initiators if i != initiator]
            )
            result = await self.etcd.txn([vv.unchanged, lv.unchanged], [Put(lv.key, acl.to_json())])
            if result.succeeded:
                self._know(volume, vv, acl, Versioned(lv.key, result.revision))
                return
        raise aborted(f"unexport volume {volume_id}")

    async def list_exports(self, volume_id: str) -> list[dict[str, Any]]:
        volume, _, lun, _ = await self._volume_and_lun(volume_id)
        if volume is None:
            raise Problem(404, "volume_not_found", f"no volume {volume_id}")
        return [self.export_view(volume, i) for i in (lun.initiators if lun else [])]

    # --- snapshots ------------------------------------------------------------------------

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord:
        snap, _ = await read(self.etcd, Keys.snapshot(snapshot_id), SnapshotRecord)
        if snap is None:
            raise Problem(404, "snapshot_not_found", f"no snapshot {snapshot_id}")
        return snap

    async def _created(self, key: str) -> int:
        """The revision of the transaction that created `key` (a clone or a snapshot: the one
        the data path must have seen). Waiting for etcd's current revision instead would
        wait for writes the data path never follows (leases, status), and time out."""
        kv = await self.etcd.get(key)
        return kv.create_revision if kv is not None else await self.etcd.revision()

    async def find_snapshot(self, name: str) -> SnapshotRecord | None:
        kv = await self.etcd.get(Keys.snapshot_name(name))
        if kv is None:
            return None
        snap, _ = await read(self.etcd, Keys.snapshot(kv.value.decode()), SnapshotRecord)
        return snap

    def _same_snapshot(self, snap: SnapshotRecord, volume_id: str) -> SnapshotRecord:
        if snap.source_volume_id != volume_id:
            raise Problem(
                409,
                "already_exists_with_different_parameters",
                f"snapshot {snap.name!r} exists ({snap.id}) of volume {snap.source_volume_id}",
                snapshot_id=snap.id,
            )
        return snap

    async def create_snapshot(self, name: str, volume_id: str) -> tuple[SnapshotRecord, bool]:
        """A metadata-only, copy-on-write snapshot: ready at once."""
        name_key = Keys.snapshot_name(name)
        for _ in range(MAX_ATTEMPTS):
            existing = await self.find_snapshot(name)
            if existing is not None:
                # a retry: the first call may have failed waiting for the data path
                same = self._same_snapshot(existing, volume_id)
                await wait_data_path(self.etcd, await self._created(Keys.snapshot(same.id)))
                return same, False
            volume, vv = await read(self.etcd, Keys.volume(volume_id), VolumeRecord)
            if volume is None:
                raise Problem(404, "volume_not_found", f"no volume {volume_id}")
            snap = SnapshotRecord(
                id=new_id("snap"),
                name=name,
                source_volume_id=volume_id,
                size_bytes=volume.size_bytes,
                block_size=volume.block_size,
                created_at=round(time.time(), 6),
                epoch=volume.epoch,
                base=list(volume.base),
            )
            # The snapshot freezes the volume's epoch: from the next one on, the first write
            # to each extent copies it aside first (docs/snapshots.md).
            bumped = dataclasses.replace(volume, epoch=volume.epoch + 1)
            result = await self.etcd.txn(
                [Compare.version(name_key) == 0, vv.unchanged],
                [
                    Put(Keys.snapshot(snap.id), snap.to_json()),
                    Put(name_key, snap.id.encode()),
                    Put(vv.key, bumped.to_json()),
                ],
            )
            if result.succeeded:
                await wait_data_path(self.etcd, result.revision)
                return snap, True
        raise aborted(f"create snapshot {name!r}")

    async def delete_snapshot(self, snapshot_id: str) -> None:
        for _ in range(MAX_ATTEMPTS):
            snap, sv = await read(self.etcd, Keys.snapshot(snapshot_id), SnapshotRecord)
            if snap is None:
                return
            name_key = Keys.snapshot_name(snap.name)
            result = await self.etcd.txn(
                [sv.unchanged, Compare.value(name_key) == snapshot_id.encode()],
                # the garbage collector frees the copies only it needed (docs/snapshots.md)
                [
                    Delete(sv.key),
                    Delete(name_key),
                    Put(Keys.gc_snapshot(snapshot_id), snap.to_json()),
                ],
            )
            if result.succeeded:
                return
        raise aborted(f"delete snapshot {snapshot_id}")

    async def list_snapshots(self, limit: int, token: str | None, volume_id: str | None) -> Listing:
        def render(kv: KeyValue) -> dict[str, Any] | None:
            snap = SnapshotRecord.from_json(kv.value)
            if volume_id is not None and snap.source_volume_id != volume_id:
                return None
            return snapshot_view(snap)

        return await list_page(self.etcd, Keys.SNAPSHOTS, limit, token, as_json(render))
