"""The etcd client against a real etcd: keys, pages, transactions, leases, watches, caches."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lunastor.common.etcd import (
    Compare,
    Delete,
    Etcd,
    EtcdConfig,
    EtcdRequestError,
    EtcdUnavailable,
    EventType,
    Get,
    KeyValue,
    PrefixCache,
    Put,
    WatchEvent,
    WatchItem,
)
from tests.support.etcd import EtcdServer
from tests.support.procs import free_port


@pytest.fixture
async def etcd(etcd_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[Etcd]:
    config = EtcdConfig(endpoints=[etcd_server.endpoint], namespace=etcd_prefix, timeout=3)
    async with await Etcd.connect(config) as client:
        yield client


async def test_put_get_delete_round_trip(etcd: Etcd) -> None:
    assert await etcd.get("a") is None
    rev = await etcd.put("a", b"\x00\xffone")
    kv = await etcd.get("a")
    assert kv == KeyValue("a", b"\x00\xffone", rev, rev, 1, 0)
    rev2 = await etcd.put("a", b"two")
    kv = await etcd.get("a")
    assert kv is not None
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"two", rev, rev2, 2)
    assert await etcd.delete("a") is True
    assert await etcd.delete("a") is False
    assert await etcd.get("a") is None


async def test_namespace_isolates_clients(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    one = EtcdConfig([etcd_server.endpoint], namespace=etcd_prefix + "one/")
    two = EtcdConfig([etcd_server.endpoint], namespace=etcd_prefix + "two/")
    async with await Etcd.connect(one) as a, await Etcd.connect(two) as b:
        await a.put("k", b"from a")
        await b.put("k", b"from b")
        assert (await a.get_prefix(""))[0][0].value == b"from a"
        assert [kv.key for kv in (await b.get_prefix(""))[0]] == ["k"]
        assert await a.delete_prefix("") == 1
        assert await b.get("k") is not None
    async with await Etcd.connect(EtcdConfig([etcd_server.endpoint], namespace=etcd_prefix)) as c:
        kvs, _ = await c.get_prefix("")
        assert [kv.key for kv in kvs] == ["two/k"]


async def test_get_prefix_pages_are_pinned_to_the_first_revision(etcd: Etcd) -> None:
    for i in range(25):
        await etcd.put(f"vol/{i:03d}", str(i).encode())
    await etcd.put("volx", b"not under vol/")
    pages = etcd.iter_prefix("vol/", page_size=10)
    first = await anext(pages)
    assert [kv.key for kv in first.kvs] == [f"vol/{i:03d}" for i in range(10)] and first.more
    # Changes after the first page must not show up in the later ones.
    await etcd.put("vol/005", b"changed")
    await etcd.put("vol/024", b"changed")
    await etcd.put("vol/030", b"new")
    rest = [page async for page in pages]
    assert [len(p.kvs) for p in rest] == [10, 5]
    assert all(p.revision == first.revision for p in rest)
    assert rest[-1].kvs[-1].value == b"24" and not rest[-1].more
    kvs, rev = await etcd.get_prefix("vol/", page_size=7)
    assert len(kvs) == 26 and rev > first.revision
    old, old_rev = await etcd.get_prefix("vol/", page_size=4, revision=first.revision)
    assert old_rev == first.revision and len(old) == 25 and old[5].value == b"5"


async def test_get_page_continues_after_a_token(etcd: Etcd) -> None:
    for name in ["a", "b", "c", "d", "e"]:
        await etcd.put(f"v/{name}", name.encode())
    page = await etcd.get_page("v/", None, 2)
    assert [kv.key for kv in page.kvs] == ["v/a", "v/b"] and page.more
    await etcd.delete("v/c")
    page2 = await etcd.get_page("v/", page.last_key, 2, page.revision)
    assert [kv.key for kv in page2.kvs] == ["v/c", "v/d"] and page2.more
    page3 = await etcd.get_page("v/", page2.last_key, 2, page.revision)
    assert [kv.key for kv in page3.kvs] == ["v/e"] and not page3.more
    assert page3.revision == page.revision


@pytest.mark.parametrize(
    ("prefix", "start_after", "limit", "revision"),
    [
        ("v/", "w/x", 2, None),  # token from another listing
        ("v/", None, 0, None),
        ("v/", None, -1, None),
        ("v/", None, True, None),
        ("v/", None, 2, 0),
        ("v/", None, 2, "5"),
    ],
)
async def test_get_page_rejects_bad_arguments(
    etcd: Etcd, prefix: str, start_after: str | None, limit: int, revision: int | None
) -> None:
    with pytest.raises(EtcdRequestError):
        await etcd.get_page(prefix, start_after, limit, revision)


async def test_txn_compare_and_swap_on_mod_revision(etcd: Etcd) -> None:
    rev = await etcd.put("vol", b"v1")
    stale = rev - 1
    lost = await etcd.txn(
        [Compare.mod_revision("vol") == stale], [Put("vol", b"bad")], [Get("vol")]
    )
    assert not lost.succeeded
    assert lost.responses == [[KeyValue("vol", b"v1", rev, rev, 1, 0)]]
    won = await etcd.txn([Compare.mod_revision("vol") == rev], [Put("vol", b"v2")])
    assert won.succeeded and won.responses == [None] and won.revision == rev + 1
    assert (await etcd.get("vol")).value == b"v2"  # type: ignore[union-attr]


async def test_txn_ops_and_compares_table(etcd: Etcd) -> None:
    await etcd.put("t/a", b"1")
    await etcd.put("t/b", b"2")
    kv = await etcd.get("t/a")
    assert kv is not None
    cases = [
        (Compare.version("t/a") == 1, True),
        (Compare.version("t/none") == 0, True),
        (Compare.version("t/a") == 0, False),
        (Compare.value("t/a") == b"1", True),
        (Compare.value("t/a") != b"1", False),
        (Compare.create_revision("t/a") == kv.create_revision, True),
        (Compare.create_revision("t/a") < kv.create_revision, False),
        (Compare.mod_revision("t/b") > kv.mod_revision, True),
        (Compare.lease("t/a") == 0, True),
    ]
    for compare, expected in cases:
        result = await etcd.txn([compare], [Get("t/", prefix=True)], [])
        assert result.succeeded is expected, compare
    result = await etcd.txn([], [Put("t/c", b"3"), Delete("t/a"), Get("t/", prefix=True)])
    assert result.responses[0] is None and result.responses[1] == 1
    got = result.responses[2]
    assert isinstance(got, list) and [k.key for k in got] == ["t/b", "t/c"]
    result = await etcd.txn([], [Get("t/", prefix=True, limit=1), Get("t/none", limit=1)])
    assert [[k.key for k in got] for got in result.responses] == [["t/b"], []]  # type: ignore[union-attr]
    result = await etcd.txn([], [Delete("t/", prefix=True)])
    assert result.responses == [2]


@pytest.mark.parametrize(
    "bad",
    [
        lambda: Compare.mod_revision("k") == "3",
        lambda: Compare.version("k") == True,  # noqa: E712 - a bool is not a version
        lambda: Compare.value("k") == "text",
        lambda: Compare("k", Compare.version("k").target, "<=", 1),  # type: ignore[arg-type]
    ],
)
def test_compare_rejects_bad_operands(bad: object) -> None:
    with pytest.raises(EtcdRequestError):
        bad()  # type: ignore[operator]


async def test_bad_input_gives_typed_errors(etcd: Etcd) -> None:
    with pytest.raises(EtcdRequestError):
        await etcd.put(b"k", b"v")  # type: ignore[arg-type]
    with pytest.raises(EtcdRequestError):
        await etcd.put("k", "not bytes")  # type: ignore[arg-type]
    with pytest.raises(EtcdRequestError):
        await etcd.txn([], ["put k"])  # type: ignore[list-item]
    with pytest.raises(EtcdRequestError, match="duplicate key"):
        await etcd.txn([], [Put("k", b"1"), Put("k", b"2")])
    with pytest.raises(EtcdRequestError):
        await etcd.grant(0)


async def test_create_only_if_absent(etcd: Etcd) -> None:
    assert await etcd.create("once", b"first") is True
    assert await etcd.create("once", b"second") is False
    assert (await etcd.get("once")).value == b"first"  # type: ignore[union-attr]


async def test_lease_grant_attach_revoke(etcd: Etcd) -> None:
    lease = await etcd.grant(10)
    await etcd.put("leased", b"x", lease=lease)
    kv = await etcd.get("leased")
    assert kv is not None and kv.lease == lease
    assert 0 < await etcd.time_to_live(lease) <= 10
    assert (await etcd.txn([Compare.lease("leased") == lease], [])).succeeded
    await etcd.revoke(lease)
    assert await etcd.get("leased") is None
    assert await etcd.time_to_live(lease) == -1
    await etcd.revoke(lease)  # already gone: not an error


async def test_unreachable_endpoint_is_unavailable() -> None:
    config = EtcdConfig([f"127.0.0.1:{free_port()}"], timeout=1)
    with pytest.raises(EtcdUnavailable):
        await Etcd.connect(config)


async def _collect(it: AsyncIterator[WatchItem], n: int) -> list[WatchItem]:
    out: list[WatchItem] = []
    async for item in it:
        out.append(item)
        if len(out) == n:
            break
    return out


async def test_watch_prefix_from_a_revision(etcd: Etcd) -> None:
    _, rev = await etcd.get_prefix("w/")
    r1 = await etcd.put("w/a", b"1")
    await etcd.put("other", b"ignored")
    watch = etcd.watch_prefix("w/", rev + 1)
    task = asyncio.create_task(_collect(watch, 4))
    result = await etcd.txn([], [Put("w/b", b"2"), Put("w/c", b"3")])
    r3 = await etcd.put("w/a", b"1b")
    await etcd.delete("w/b")
    items = await asyncio.wait_for(task, 10)
    assert all(isinstance(i, WatchEvent) for i in items)
    events = [(i.type, i.kv.key, i.revision) for i in items]  # type: ignore[union-attr]
    assert events == [
        (EventType.PUT, "w/a", r1),
        (EventType.PUT, "w/b", result.revision),
        (EventType.PUT, "w/c", result.revision),
        (EventType.PUT, "w/a", r3),
    ]


async def test_prefix_cache_follows_changes(etcd: Etcd) -> None:
    await etcd.put("chunks/1", b"up")
    async with PrefixCache(etcd, "chunks/") as cache:
        assert dict(cache.items) == {"chunks/1": await etcd.get("chunks/1")}
        rev = await etcd.put("chunks/2", b"up")
        await cache.wait_for_revision(rev, timeout=5)
        assert set(cache.items) == {"chunks/1", "chunks/2"}
        rev = (await etcd.txn([], [Delete("chunks/1"), Put("chunks/2", b"draining")])).revision
        await cache.wait_for(lambda c: c.revision >= rev, timeout=5)
        assert list(cache.items) == ["chunks/2"]
        assert cache.get("chunks/2").value == b"draining"  # type: ignore[union-attr]
        with pytest.raises(TimeoutError):
            await cache.wait_for(lambda c: "chunks/3" in c.items, timeout=0.2)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    names=st.sets(st.text("ab/é\x00", min_size=1, max_size=4), max_size=25),
    page_size=st.integers(1, 8),
)
async def test_pages_list_exactly_the_prefix_in_order(
    etcd: Etcd, names: set[str], page_size: int
) -> None:
    base = f"p{uuid.uuid4().hex[:6]}/"
    if names:
        await etcd.txn([], [Put(base + n, n.encode()) for n in names])
    await etcd.put(base[:-1] + "0", b"sibling outside the prefix")
    kvs, rev = await etcd.get_prefix(base, page_size=page_size)
    expected = sorted(base + n for n in names)
    assert [kv.key for kv in kvs] == sorted(expected, key=lambda k: k.encode())
    pages = [p async for p in etcd.iter_prefix(base, page_size=page_size, revision=rev)]
    assert all(len(p.kvs) <= page_size for p in pages)
    assert [kv for p in pages for kv in p.kvs] == kvs
