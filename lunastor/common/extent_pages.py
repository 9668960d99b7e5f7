"""The extent map in etcd: pages of extents and the reverse index (docs/etcd-schema.md).

**Pages.** `PAGE_EXTENTS` extents of one store volume share one key,
`/v1/extents/<store volume>/p<page 7 digits>`, a msgpack value listing each allocated extent
compactly (`encode_page`). Each extent carries its own **stamp**: the etcd revision its last
change was based on. Every change of a page is one transaction that compares the mod_revision
of every key it read (`version == 0` for an absent one); when that fails because *another*
extent of the page (or a shared reverse-index shard) changed, the keys are re-read in the
failure branch and the change is re-applied only if every extent it touches still carries the
stamp the caller based its change on. So a change to one extent never overwrites, nor is lost
to, a concurrent change to another.

Stamps of one extent strictly increase over its whole life (even across delete and
re-create): a change is based on reads made at revision B, so its stamp B is below its commit
revision, and any later change reads at or after that commit. Callers compare stamps for
equality only (`ExtentMap`'s `Entry.mod_revision`).

**Reverse index.** `/v1/chunk-extents/<chunk>/<bucket 3 hex>`: per chunk server, which extents
it is a member of, in `SHARD_BUCKETS` shards chosen by (store volume, index // SHARD_SPAN), each
listing (store volume, sorted indexes) (`encode_shard`). Kept in the same transactions as the
pages; an empty shard is deleted, so "no key under the prefix" means "member of nothing".

**The layout before pages** (one JSON `ExtentRecord` per `Keys.extent` key) is still read: its
stamp is the key's mod_revision. The first change of such an extent moves it into its page in
the same transaction and leaves the value `MOVED` at the old key, so an older chunk server
that still reads only that key fails its request (it cannot decode it) instead of taking
the extent for unallocated and allocating it afresh. Meta's `ExtentMigrator` moves every
remaining one (docs/scale.md, "Migration").
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import msgpack

from lunastor.common.etcd import Compare, Delete, Etcd, Get, KeyValue, Put
from lunastor.common.etcd.model import Op
from lunastor.common.records import ExtentRecord, Keys, RecordError

PAGE_EXTENTS = 64  # extents per page key
SHARD_BUCKETS = 1024  # reverse-index shards per chunk server (values well under a bbolt page)
SHARD_SPAN = 1024  # consecutive extent indexes of a volume that share a shard choice
PAGE_FORMAT = 2  # 1: [1, rows] with stamps and chunk ids one by one (still read)
SHARD_FORMAT = 2  # 1: [1, [volume, [indexes], ...]] (still read)
MOVED = b"moved-to-page"  # a legacy key whose extent now lives in its page
ANY = -1  # Change.expect: overwrite whatever is there (a preserved copy's first record)
MAX_ATTEMPTS = 1000  # conflicts on other extents of a page or on shards, before giving up

_CHUNK_ID = re.compile(r"chunk-[0-9a-f]{12}")
_VOLUME_ID = re.compile(r"vol-[0-9a-f]{16}")


def page_of(index: int) -> int:
    return index // PAGE_EXTENTS


def page_key(volume: str, index: int) -> str:
    """The page holding extent `index` of store volume `volume`."""
    return f"{Keys.EXTENTS}{volume}/p{page_of(index):07d}"


def parse_page_key(key: str) -> tuple[str, int] | None:
    """(store volume, page number) of a page key; None for any other key."""
    volume, sep, page = key.removeprefix(Keys.EXTENTS).rpartition("/")
    if not sep or not volume or page[:1] != "p" or not page[1:].isdigit():
        return None
    return volume, int(page[1:])


def shard_key(chunk: str, volume: str, index: int) -> str:
    """The reverse-index shard of `chunk` that lists extent `index` of `volume`."""
    bucket = zlib.crc32(f"{volume}/{index // SHARD_SPAN}".encode()) % SHARD_BUCKETS
    return f"{Keys.chunk_extents(chunk)}{bucket:03x}"


# -- codecs ------------------------------------------------------------------------------------


def _pack_id(value: str, pattern: re.Pattern[str], prefix: int) -> str | bytes:
    return bytes.fromhex(value[prefix:]) if pattern.fullmatch(value) else value


def _unpack_id(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        return name + value.hex()
    if isinstance(value, str):
        return value
    raise RecordError(f"extent page: bad id {value!r}")


def _chunk(c: str) -> str | bytes:
    return _pack_id(c, _CHUNK_ID, 6)


# Fields after the first four, in order, with the default that lets them be left out.
_TAIL: tuple[tuple[str, Any], ...] = (
    ("copies", 0),
    ("epoch", 0),
    ("converging", False),
    ("until", 0),
    ("origin", ""),
)


def _pack_ids(ids: Sequence[str]) -> bytes | list[str | bytes]:
    """Chunk ids as one run of 6-byte ids when every one is `chunk-<12 hex>` (the usual
    case: 20 B for three replicas), else a list of each packed on its own."""
    if all(_CHUNK_ID.fullmatch(c) for c in ids):
        return b"".join(bytes.fromhex(c[6:]) for c in ids)
    return [_chunk(c) for c in ids]


def _unpack_ids(value: Any) -> list[str]:
    if isinstance(value, bytes):
        if len(value) % 6:
            raise RecordError(f"extent page: bad chunk id run {value!r}")
        return ["chunk-" + value[i : i + 6].hex() for i in range(0, len(value), 6)]
    return [_unpack_id(c, "chunk-") for c in value]


def encode_page(entries: Mapping[int, tuple[ExtentRecord, int]]) -> bytes:
    """One page's value from {extent index: (record, stamp)}.

    Format 2: `[2, top, rows]`, each row `[slot, top - stamp, gen, replicas, <_TAIL>,
    strays]` with trailing defaults left out: the stamps of a page are mostly one
    allocation's, so their distance to the page's newest stamp is one byte where the stamp
    itself is five; replicas and strays are one run of 6-byte chunk ids. Both keep every
    page under one bbolt leaf's share (docs/scale.md, "etcd bytes per extent")."""
    top = max((stamp for _, stamp in entries.values()), default=0)
    rows = []
    for index in sorted(entries):
        rec, stamp = entries[index]
        row: list[Any] = [index % PAGE_EXTENTS, top - stamp, rec.gen, _pack_ids(rec.replicas)]
        row += [getattr(rec, name) for name, _ in _TAIL]
        row.append(_pack_ids(rec.strays))
        while len(row) > 4 and row[-1] in ("", 0, False, [], b""):  # trailing defaults
            row.pop()
        rows.append(row)
    return msgpack.packb([PAGE_FORMAT, top, rows])


def decode_page(volume: str, page: int, raw: bytes) -> dict[int, tuple[ExtentRecord, int]]:
    """{extent index: (record, stamp)} of a page value (format 2, or 1 as written before);
    RecordError if it is not one."""
    try:
        body = msgpack.unpackb(raw, strict_map_key=False)
        version = body[0]
        if version == PAGE_FORMAT:
            _, top, rows = body
        elif version == 1:  # [1, rows], each row's stamp itself, chunk ids one by one
            _, rows = body
            top = None
        else:
            raise RecordError(f"extent page: unsupported format version {version!r}")
        out = {}
        for row in rows:
            slot, stamp, gen, replicas = row[:4]
            tail = row[4:]
            fields: dict[str, Any] = {
                name: tail[i] if i < len(tail) else d for i, (name, d) in enumerate(_TAIL)
            }
            strays = tail[len(_TAIL)] if len(tail) > len(_TAIL) else []
            index = page * PAGE_EXTENTS + int(slot)
            rec = ExtentRecord(
                volume=volume,
                index=index,
                gen=int(gen),
                replicas=_unpack_ids(replicas),
                strays=_unpack_ids(strays),
                **fields,
            )
            out[index] = (rec, int(stamp) if top is None else int(top) - int(stamp))
        return out
    except RecordError:
        raise
    except (ValueError, TypeError, IndexError, msgpack.UnpackException) as exc:
        raise RecordError(f"extent page {volume}/p{page}: {exc}") from None


def encode_shard(held: Mapping[str, Iterable[int]]) -> bytes:
    """A reverse-index shard's value from {store volume: extent indexes}.

    Format 2: `[2, ids, entries, others]`: `ids` the 8-byte ids of the `vol-<16 hex>`
    volumes, one run; `entries` one per id, in order: the index itself when it is the only
    one (the dense cluster's usual case: ~49 volumes a shard, one extent each), else the
    sorted indexes as a list of first index, then differences; `others` a flat list of
    (name, entry) for any other name (a preserved copy `<vol>.e<n>`). 9 B a membership."""
    ids = bytearray()
    entries: list[Any] = []
    others: list[Any] = []
    for volume in sorted(held):
        ixs = sorted(held[volume])
        entry: Any = ixs[0] if len(ixs) == 1 else [ixs[0], *(b - a for a, b in pairwise(ixs))]
        if _VOLUME_ID.fullmatch(volume):
            ids += bytes.fromhex(volume[4:])
            entries.append(entry)
        else:
            others += [volume, entry]
    return msgpack.packb([SHARD_FORMAT, bytes(ids), entries, others])


def _shard_entry(entry: Any) -> set[int]:
    if isinstance(entry, int) and not isinstance(entry, bool):
        return {entry}
    out, at = set(), 0
    for i, step in enumerate(entry):
        at = int(step) if i == 0 else at + int(step)
        out.add(at)
    return out


def decode_shard(raw: bytes) -> dict[str, set[int]]:
    """{store volume: extent indexes} of a reverse-index shard (format 2, or 1 as written
    before); RecordError if malformed."""
    try:
        body = msgpack.unpackb(raw)
        version = body[0]
        if version == 1:  # [1, [volume, [indexes], ...]]
            _, flat = body
            if len(flat) % 2:
                raise RecordError("reverse-index shard: odd list")
            return {
                _unpack_id(flat[i], "vol-"): {int(x) for x in flat[i + 1]}
                for i in range(0, len(flat), 2)
            }
        if version != SHARD_FORMAT:
            raise RecordError(f"reverse-index shard: unsupported format {version!r}")
        _, ids, entries, others = body
        if len(ids) != 8 * len(entries) or len(others) % 2:
            raise RecordError("reverse-index shard: ids and entries do not match")
        out = {
            "vol-" + ids[8 * i : 8 * i + 8].hex(): _shard_entry(e) for i, e in enumerate(entries)
        }
        for i in range(0, len(others), 2):
            out[str(others[i])] = _shard_entry(others[i + 1])
        return out
    except RecordError:
        raise
    except (ValueError, TypeError, IndexError, msgpack.UnpackException) as exc:
        raise RecordError(f"reverse-index shard: {exc}") from None


def decode_kv(key: str, value: bytes, mod_revision: int) -> list[tuple[ExtentRecord, int]]:
    """The (record, stamp) pairs one key under `Keys.EXTENTS` holds: a page's extents, a
    legacy record, or nothing (a `MOVED` marker, an undecodable value)."""
    page = parse_page_key(key)
    try:
        if page is not None:
            return list(decode_page(*page, value).values())
        if value == MOVED:
            return []
        return [(ExtentRecord.from_json(value), mod_revision)]
    except RecordError:
        return []


def decode_entries(kvs: Iterable[KeyValue]) -> list[tuple[ExtentRecord, int]]:
    """Every (record, stamp) of a listing under `Keys.EXTENTS`, both layouts."""
    return [e for kv in kvs for e in decode_kv(kv.key, kv.value, kv.mod_revision)]


def extent_records(kvs: Iterable[KeyValue]) -> list[ExtentRecord]:
    return [rec for rec, _ in decode_entries(kvs)]


def held_counts(index: Iterable[KeyValue], extents: Iterable[KeyValue]) -> dict[str, int]:
    """Extents each chunk server is a member of: from the reverse index (`index`, a listing
    of `Keys.CHUNK_EXTENTS`) and, for extents still in the layout before pages (which the
    index does not list), from the map (`extents`, a listing of `Keys.EXTENTS`)."""
    out: dict[str, int] = {}
    for kv in index:
        chunk = kv.key.removeprefix(Keys.CHUNK_EXTENTS).partition("/")[0]
        try:
            held = sum(len(ix) for ix in decode_shard(kv.value).values())
        except RecordError:
            continue
        out[chunk] = out.get(chunk, 0) + held
    for kv in extents:
        if parse_page_key(kv.key) is None:
            for rec, _ in decode_kv(kv.key, kv.value, kv.mod_revision):
                for chunk in rec.replicas:
                    out[chunk] = out.get(chunk, 0) + 1
    return out


# -- transactions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """Set extent (volume, index) to `new` (None: delete it) if it still carries stamp
    `expect` (None: it must not exist; ANY: whatever it holds)."""

    volume: str
    index: int
    expect: int | None
    new: ExtentRecord | None


@dataclass(frozen=True)
class Planned:
    compares: list[Compare]
    ops: list[Op]
    stored: list[ExtentRecord | None]  # what each change stored (strays filled in)


@dataclass(frozen=True)
class Committed:
    stored: list[ExtentRecord | None]  # per change: the record stored (strays filled in)
    stamp: int  # the stamp every stored record carries
    revision: int  # the transaction's revision


class Lost(Exception):
    """An extent a change is based on is no longer what the caller read."""


class NeedKeys(Exception):
    """The plan needs keys the view lacks (reverse-index shards): read them, plan again."""

    def __init__(self, keys: set[str]) -> None:
        super().__init__(f"read {sorted(keys)} first")
        self.keys = keys


def _current(
    view: Mapping[str, KeyValue | None], volume: str, index: int
) -> tuple[ExtentRecord, int, bool] | None:
    """(record, stamp, in a page) of the extent in `view`."""
    kv = view[page_key(volume, index)]
    if kv is not None:
        found = decode_page(volume, page_of(index), kv.value).get(index)
        if found is not None:
            return found[0], found[1], True
    legacy = view[Keys.extent(volume, index)]
    if legacy is None or legacy.value == MOVED:
        return None
    return ExtentRecord.from_json(legacy.value), legacy.mod_revision, False


def extent_keys(volume: str, index: int) -> list[str]:
    """The keys that may hold extent (volume, index): its page, and its key before pages."""
    return [page_key(volume, index), Keys.extent(volume, index)]


def plan(changes: Sequence[Change], view: Mapping[str, KeyValue | None], base: int) -> Planned:
    """The transaction applying `changes` to the keys in `view`, read at revision `base`.

    Raises Lost if an extent is no longer what a change expects, and NeedKeys for keys the
    plan needs that `view` lacks (read them and plan again). Pure."""
    pages: dict[str, dict[int, tuple[ExtentRecord, int]]] = {}
    shards: dict[str, dict[str, set[int]]] = {}
    legacy_ops: dict[str, Op] = {}
    stored: list[ExtentRecord | None] = []
    missing: set[str] = set()
    for ch in changes:
        pkey, lkey = extent_keys(ch.volume, ch.index)
        cur = _current(view, ch.volume, ch.index)
        if ch.expect != ANY and (cur[1] if cur is not None else None) != ch.expect:
            raise Lost(f"extent {ch.volume}/{ch.index} changed")
        if pkey not in pages:
            kv = view[pkey]
            pages[pkey] = decode_page(ch.volume, page_of(ch.index), kv.value) if kv else {}
        old = cur[0] if cur is not None else None
        new = ch.new
        if new is not None:
            former = set(old.replicas) | set(old.strays) if old is not None else set()
            strays = (former | set(new.strays)) - set(new.replicas)
            new = dataclasses.replace(new, strays=sorted(strays))
            pages[pkey][ch.index] = (new, base)
        else:
            pages[pkey].pop(ch.index, None)
        stored.append(new)
        legacy = view[lkey]
        if legacy is not None and (new is None or legacy.value != MOVED):
            # the layout before pages: the extent moves (a marker stays) or goes
            legacy_ops[lkey] = Put(lkey, MOVED) if new is not None else Delete(lkey)
        indexed = set(old.replicas) if cur is not None and cur[2] and old is not None else set()
        members = set(new.replicas) if new is not None else set()
        for chunk in indexed ^ members:
            skey = shard_key(chunk, ch.volume, ch.index)
            if skey not in shards:
                if skey not in view:
                    missing.add(skey)
                    continue
                kv = view[skey]
                shards[skey] = decode_shard(kv.value) if kv is not None else {}
            held = shards[skey].setdefault(ch.volume, set())
            if chunk in members:
                held.add(ch.index)
            else:
                held.discard(ch.index)
                if not held:
                    del shards[skey][ch.volume]
    if missing:
        raise NeedKeys(missing)
    ops: list[Op] = list(legacy_ops.values())
    for pkey, entries in pages.items():
        ops.append(Put(pkey, encode_page(entries)) if entries else Delete(pkey))
    for skey, listed in shards.items():
        ops.append(Put(skey, encode_shard(listed)) if listed else Delete(skey))
    compares = [
        Compare.mod_revision(k) == kv.mod_revision if kv is not None else Compare.version(k) == 0
        for k, kv in view.items()
    ]
    return Planned(compares, ops, stored)


async def read_keys(etcd: Etcd, keys: Iterable[str]) -> tuple[dict[str, KeyValue | None], int]:
    """The current value of each key (None: absent), all of one revision, and that revision."""
    wanted = sorted(set(keys))
    res = await etcd.txn([], [Get(k) for k in wanted])
    found: dict[str, KeyValue | None] = {}
    for key, kvs in zip(wanted, res.responses, strict=True):
        found[key] = kvs[0] if isinstance(kvs, list) and kvs else None
    return found, res.revision


async def commit(
    etcd: Etcd,
    changes: Sequence[Change],
    *,
    view: Mapping[str, KeyValue | None] | None = None,
    base: int = 0,
    extra: Sequence[Op] = (),
) -> Committed | None:
    """Apply `changes` (and `extra` ops) in one transaction, or None if an extent was not
    what a change expects (re-read, decide again).

    `view`/`base`: keys the caller has already read (a watched cache) and their revision;
    the rest is read here. A conflict on keys the changes do not depend on (another extent
    of a page, a reverse-index shard) is retried, up to MAX_ATTEMPTS times."""
    known: dict[str, KeyValue | None] = dict(view or {})
    for attempt in range(MAX_ATTEMPTS):
        missing = {k for ch in changes for k in extent_keys(ch.volume, ch.index) if k not in known}
        while True:
            if missing:
                fetched, rev = await read_keys(etcd, missing)
                known.update(fetched)
                base = max(base, rev)
            try:
                planned = plan(changes, known, base)
                break
            except Lost:
                return None
            except NeedKeys as need:
                missing = need.keys
        res = await etcd.txn(planned.compares, [*planned.ops, *extra], [Get(k) for k in known])
        if res.succeeded:
            return Committed(planned.stored, base, res.revision)
        for key, kvs in zip(list(known), res.responses, strict=True):
            known[key] = kvs[0] if isinstance(kvs, list) and kvs else None
        base = max(base, res.revision)
        if attempt >= 4:  # many writers on one page: spread them out
            await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * attempt)))
    return None  # contended beyond reason: the caller re-reads and decides again
