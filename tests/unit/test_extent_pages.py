"""The extent map's pages and reverse index (lunastor/common/extent_pages.py): codecs, the pure
transaction planner, and interleavings of concurrent changes over an in-memory store with
etcd's transaction semantics (the real etcd: tests/integration/meta/test_extent_pages_etcd.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lunastor.common.etcd import Delete, KeyValue, Put
from lunastor.common.etcd.model import CompareTarget
from lunastor.common.extent_pages import (
    ANY,
    MOVED,
    PAGE_EXTENTS,
    Change,
    Lost,
    NeedKeys,
    Planned,
    decode_entries,
    decode_page,
    decode_shard,
    encode_page,
    encode_shard,
    extent_keys,
    held_counts,
    page_key,
    plan,
    shard_key,
)
from lunastor.common.records import ExtentRecord, Keys

V = "vol-0123456789abcdef"
A, B, C, D = (f"chunk-{i:012x}" for i in range(1, 5))

chunk_ids = st.one_of(
    st.sampled_from([A, B, C, D]), st.text("abcxyz-0123", min_size=1, max_size=12)
)
records = st.builds(
    ExtentRecord,
    volume=st.just(V),
    index=st.integers(0, 3 * PAGE_EXTENTS - 1),
    gen=st.integers(1, 2**40),
    replicas=st.lists(chunk_ids, max_size=5),
    epoch=st.integers(0, 2**33),
    converging=st.booleans(),
    until=st.integers(0, 2**33),
    origin=st.sampled_from(["", "vol-x", f"{V}.e3"]),
    copies=st.integers(0, 5),
    strays=st.lists(chunk_ids, max_size=3),
)


@given(st.lists(st.tuples(records, st.integers(1, 2**50)), max_size=8))
def test_page_codec_round_trips_every_field(recs: list[tuple[ExtentRecord, int]]) -> None:
    page = 1
    entries = {}
    for r, stamp in recs:
        r = dataclasses.replace(r, index=page * PAGE_EXTENTS + r.index % PAGE_EXTENTS)
        entries[r.index] = (r, stamp)
    assert decode_page(V, page, encode_page(entries)) == entries


def test_page_bytes_per_extent_are_small() -> None:
    """A full page of 3-replica extents: the value that the bench's < 100 B rests on."""
    entries = {
        i: (ExtentRecord(V, i, gen=1, replicas=[A, B, C], copies=3), 123_456_789)
        for i in range(PAGE_EXTENTS)
    }
    assert len(encode_page(entries)) / PAGE_EXTENTS < 26
    # one extent changed since: only its row grows (by the distance of its stamp)
    entries[5] = (dataclasses.replace(entries[5][0], gen=2), 123_456_000)
    assert len(encode_page(entries)) / PAGE_EXTENTS < 26.1


def test_shard_codec_round_trips_and_packs_volume_ids() -> None:
    held = {V: {0, 5, 70_000}, f"{V}.e2": {1}, "odd-name": {3}, "vol-00000000000000ff": {9}}
    assert decode_shard(encode_shard(held)) == held
    assert len(encode_shard({V: {0}})) < 16
    # a dense shard (the full cluster's: ~49 volumes of one extent each): 9 B a membership
    dense = {f"vol-{k:016x}": {k % 16} for k in range(49)}
    assert decode_shard(encode_shard(dense)) == dense
    assert len(encode_shard(dense)) <= 9 * 49 + 9
    # a large volume's consecutive extents: about a byte each
    run = {V: set(range(1024, 2048))}
    assert decode_shard(encode_shard(run)) == run
    assert len(encode_shard(run)) < 1100


def _page_format_1(entries: dict[int, tuple[ExtentRecord, int]]) -> bytes:
    """A page exactly as the code before format 2 wrote it (still read)."""
    rows = []
    for index in sorted(entries):
        rec, stamp = entries[index]
        row: list[object] = [index % PAGE_EXTENTS, stamp, rec.gen]
        row.append([bytes.fromhex(c[6:]) if c.startswith("chunk-") else c for c in rec.replicas])
        row += [rec.copies, rec.epoch, rec.converging, rec.until, rec.origin]
        row.append([bytes.fromhex(c[6:]) if c.startswith("chunk-") else c for c in rec.strays])
        while len(row) > 4 and row[-1] in ("", 0, False, []):
            row.pop()
        rows.append(row)
    return msgpack.packb([1, rows])


def _shard_format_1(held: dict[str, set[int]]) -> bytes:
    """A reverse-index shard exactly as the code before format 2 wrote it (still read)."""
    flat: list[object] = []
    for volume in sorted(held):
        packed = bytes.fromhex(volume[4:]) if len(volume) == 20 else volume
        flat += [packed, sorted(held[volume])]
    return msgpack.packb([1, flat])


def test_pages_and_shards_of_format_1_are_read_and_rewritten_in_format_2() -> None:
    """A cluster written before format 2 keeps working: its pages and shards decode, and
    the first change of the page rewrites it (and the shards it touches) in format 2."""
    one = ExtentRecord(V, 1, gen=3, replicas=[A, B, "odd"], copies=3, strays=[D])
    two = ExtentRecord(V, 2, gen=1, replicas=[A, B, C], copies=3, epoch=4)
    entries = {1: (one, 70_000), 2: (two, 9)}
    assert decode_page(V, 0, _page_format_1(entries)) == entries
    held = {V: {1, 2}, f"{V}.e2": {1}}
    assert decode_shard(_shard_format_1(held)) == held
    store = {page_key(V, 1): (_page_format_1(entries), 70_001)}
    for chunk in (A, B):
        store[shard_key(chunk, V, 1)] = (_shard_format_1({V: {1, 2}}), 70_001)
    store[shard_key(C, V, 2)] = (_shard_format_1({V: {2}}), 70_001)
    run(store, [Change(V, 2, 9, dataclasses.replace(two, gen=2, replicas=[A, D, C]))], 80_000)
    assert msgpack.unpackb(store[page_key(V, 1)][0])[0] == 2
    assert msgpack.unpackb(store[shard_key(D, V, 2)][0])[0] == 2
    got = entries_of(store)
    assert got[(V, 1)] == one and got[(V, 2)].replicas == [A, D, C]
    assert got[(V, 2)].strays == [B]
    assert index_of(store) == {A: {(V, 1), (V, 2)}, B: {(V, 1)}, C: {(V, 2)}, D: {(V, 2)}}


def view_of(store: dict[str, tuple[bytes, int]], keys: list[str]) -> dict[str, KeyValue | None]:
    return {k: KeyValue(k, *store[k], store[k][1], 1) if k in store else None for k in keys}


def apply(store: dict[str, tuple[bytes, int]], planned: Planned, revision: int) -> bool:
    """etcd's Txn over `store`: every compare holds, then every op, at `revision`."""
    for c in planned.compares:
        held = store.get(c.key)
        if c.target is CompareTarget.VERSION:
            if (held is None) != (c.operand == 0):
                return False
        elif held is None or held[1] != c.operand:
            return False
    for op in planned.ops:
        if isinstance(op, Put):
            store[op.key] = (op.value, revision)
        elif isinstance(op, Delete):
            store.pop(op.key, None)
    return True


def run(store: dict[str, tuple[bytes, int]], changes: list[Change], revision: int) -> Planned:
    """Plan against the store as it is (reading what the plan asks for) and apply."""
    keys = [k for ch in changes for k in extent_keys(ch.volume, ch.index)]
    while True:
        try:
            planned = plan(changes, view_of(store, keys), revision - 1)
            break
        except NeedKeys as need:
            keys += sorted(need.keys)
    assert apply(store, planned, revision)
    return planned


def index_of(store: dict[str, tuple[bytes, int]]) -> dict[str, set[tuple[str, int]]]:
    out: dict[str, set[tuple[str, int]]] = {}
    for key, (value, _) in store.items():
        if key.startswith(Keys.CHUNK_EXTENTS):
            chunk = key.removeprefix(Keys.CHUNK_EXTENTS).partition("/")[0]
            for vol, ixs in decode_shard(value).items():
                out.setdefault(chunk, set()).update((vol, i) for i in ixs)
    return out


def entries_of(store: dict[str, tuple[bytes, int]]) -> dict[tuple[str, int], ExtentRecord]:
    kvs = [KeyValue(k, v, r, r, 1) for k, (v, r) in store.items() if k.startswith(Keys.EXTENTS)]
    return {(r.volume, r.index): r for r, _ in decode_entries(kvs)}


def derived_index(store: dict[str, tuple[bytes, int]]) -> dict[str, set[tuple[str, int]]]:
    out: dict[str, set[tuple[str, int]]] = {}
    for key, rec in entries_of(store).items():
        for m in rec.replicas:
            out.setdefault(m, set()).add(key)
    return out


def test_allocate_member_change_and_delete_keep_the_reverse_index() -> None:
    store: dict[str, tuple[bytes, int]] = {}
    run(store, [Change(V, 3, None, ExtentRecord(V, 3, replicas=[A, B, C]))], 10)
    assert index_of(store) == {A: {(V, 3)}, B: {(V, 3)}, C: {(V, 3)}}
    entry = decode_page(V, 0, store[page_key(V, 3)][0])[3]
    assert entry[1] == 9  # stamped with the revision the change was based on
    # C is replaced by D while down: C becomes a stray, the index follows the members
    moved = dataclasses.replace(entry[0], gen=2, replicas=[A, B, D])
    run(store, [Change(V, 3, 9, moved)], 20)
    now = decode_page(V, 0, store[page_key(V, 3)][0])[3][0]
    assert now.replicas == [A, B, D] and now.strays == [C]
    assert index_of(store) == {A: {(V, 3)}, B: {(V, 3)}, D: {(V, 3)}}
    # C rejoins: a member again, no longer a stray
    back = dataclasses.replace(now, gen=3, replicas=[A, B, D, C])
    run(store, [Change(V, 3, 19, back)], 30)
    assert decode_page(V, 0, store[page_key(V, 3)][0])[3][0].strays == []
    run(store, [Change(V, 3, 29, None)], 40)
    assert store == {}  # page and every shard gone with the last extent


def test_a_change_based_on_an_old_stamp_is_lost() -> None:
    store: dict[str, tuple[bytes, int]] = {}
    run(store, [Change(V, 0, None, ExtentRecord(V, 0, replicas=[A]))], 10)
    with pytest.raises(Lost):
        run(store, [Change(V, 0, 8, ExtentRecord(V, 0, gen=2, replicas=[B]))], 20)
    with pytest.raises(Lost):  # allocating what exists
        run(store, [Change(V, 0, None, ExtentRecord(V, 0, replicas=[B]))], 20)
    run(store, [Change(V, 0, ANY, ExtentRecord(V, 0, gen=5, replicas=[B]))], 20)
    assert entries_of(store)[(V, 0)].strays == [A]


def test_an_extent_of_the_old_layout_moves_into_its_page_and_leaves_a_marker() -> None:
    old = ExtentRecord(V, 7, gen=4, replicas=[A, B], copies=2)
    store = {Keys.extent(V, 7): (old.to_json(), 5)}
    assert entries_of(store) == {(V, 7): old}
    assert held_counts([], [KeyValue(Keys.extent(V, 7), old.to_json(), 5, 5, 1)]) == {A: 1, B: 1}
    run(store, [Change(V, 7, 5, dataclasses.replace(old, gen=5))], 12)
    assert store[Keys.extent(V, 7)][0] == MOVED
    assert entries_of(store)[(V, 7)].gen == 5
    assert index_of(store) == {A: {(V, 7)}, B: {(V, 7)}}
    run(store, [Change(V, 7, 11, None)], 20)
    assert store == {}  # the marker goes with the extent


@dataclass
class Client:
    """One writer: reads an extent, decides a new record, commits; re-plans on a conflict
    elsewhere, gives up (Lost) if its own extent changed."""

    index: int
    replicas: list[str]
    based: int | None = None  # the stamp it read; None: absent
    view: dict[str, KeyValue | None] = field(default_factory=dict)
    base: int = 0
    outcome: str = ""  # "", committed, lost


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.lists(st.sampled_from([A, B, C, D]), max_size=3)),
        min_size=2,
        max_size=6,
    ),
    st.lists(st.integers(0, 5), min_size=1, max_size=60),
)
# c3 commits extent 1 after a conflict; c0 and c1 read it at one revision; c0 commits; c1 must
# lose (found when a retry's read was modelled at the revision of the commit that follows it)
@example([(1, []), (1, []), (0, []), (1, [])], [2, 3, 2, 3, 1])
def test_interleaved_changes_never_lose_a_change_to_another_extent(
    wanted: list[tuple[int, list[str]]], schedule: list[int]
) -> None:
    """Clients change extents of one page (some the same extent) in any interleaving of
    read / commit steps. Every client whose extent nobody else changed after its read
    commits; one whose extent changed loses; the final page holds exactly the last
    committed record per extent; the reverse index always equals what the pages say."""
    store: dict[str, tuple[bytes, int]] = {}
    revision = 1
    clients = [Client(i, sorted(set(r))) for i, r in wanted]
    last: dict[int, list[str]] = {}
    read_at: dict[int, int] = {}  # client -> commits of its extent counted when it read
    commits: dict[int, int] = {}  # extent -> how many commits changed it
    for step in schedule + [k for k in range(len(clients)) for _ in range(3)]:
        cl = clients[step % len(clients)]
        if cl.outcome:
            continue
        if not cl.view:  # read
            cl.view = view_of(store, extent_keys(V, cl.index))
            cl.base = revision  # no commit above it yet; the next one is above it
            cl.based = None
            for kv in cl.view.values():
                for rec, stamp in decode_entries([kv] if kv else []):
                    if rec.index == cl.index:
                        cl.based = stamp
            read_at[id(cl)] = commits.get(cl.index, 0)
            continue
        new = ExtentRecord(V, cl.index, replicas=cl.replicas)
        change = Change(V, cl.index, cl.based, new)
        revision += 1
        while True:
            try:
                planned = plan([change], cl.view, cl.base)
            except NeedKeys as need:
                cl.view.update(view_of(store, sorted(need.keys)))
                continue
            except Lost:
                cl.outcome = "lost"
                break
            if apply(store, planned, revision):
                cl.outcome = "committed"
                commits[cl.index] = commits.get(cl.index, 0) + 1
                last[cl.index] = cl.replicas
                break
            # the failure branch reads every compared key again, as of the last commit (this
            # attempt's `revision` was never written): a read's revision is always below the
            # commit that follows it, which is what makes stamps unique per extent
            cl.view = view_of(store, list(cl.view))
            cl.base = revision - 1
        if cl.outcome == "lost":
            assert commits.get(cl.index, 0) > read_at[id(cl)], "lost with its extent unchanged"
        else:
            assert commits[cl.index] == read_at[id(cl)] + 1, "overwrote a change it never saw"
        assert index_of(store) == {k: v for k, v in derived_index(store).items() if v}
    final = entries_of(store)
    assert {i: r.replicas for (_, i), r in final.items()} == last
