"""meta's etcd history compaction (lunastor/meta/compaction.py) against a real etcd: revisions
older than `keep` become unreadable, the newer ones and every current key stay."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from lunastor.common.etcd import EtcdCompacted
from lunastor.meta.compaction import HistoryCompactor
from tests.integration.meta.conftest import Api
from tests.support.clock import Clock


def compactions() -> float:
    return REGISTRY.get_sample_value("lunastor_etcd_compactions_total") or 0.0


async def test_history_older_than_keep_is_compacted_and_the_rest_stays(api: Api) -> None:
    etcd, clock = api.etcd, Clock()
    compactor = HistoryCompactor(etcd, keep=300, clock=clock)
    await etcd.put("k", b"1")
    await compactor.run_once()  # notes the revision of k=1
    first = await etcd.revision()
    await etcd.put("k", b"2")
    clock.now += 299
    await compactor.run_once()  # notes k=2's; nothing is 300 s old yet
    second = await etcd.revision()
    await etcd.put("k", b"3")
    await etcd.get_prefix("k", revision=first - 1)  # still readable (raises once compacted)
    before = compactions()

    clock.now += 1  # k=1's revision is 300 s old now: compacted to it, no further
    await compactor.run_once()
    assert compactions() == before + 1
    with pytest.raises(EtcdCompacted):
        await etcd.get_prefix("k", revision=first - 1)
    kvs, _ = await etcd.get_prefix("k", revision=first)
    assert [kv.value for kv in kvs] == [b"1"]
    kvs, _ = await etcd.get_prefix("k", revision=second)
    assert [kv.value for kv in kvs] == [b"2"]
    kvs, _ = await etcd.get_prefix("k")
    assert [kv.value for kv in kvs] == [b"3"]

    await compactor.run_once()  # the same time again: nothing new is old enough
    assert compactions() == before + 1
    clock.now += 299
    await compactor.run_once()  # k=2's revision is 300 s old now
    assert compactions() == before + 2
    with pytest.raises(EtcdCompacted):
        await etcd.get_prefix("k", revision=second - 1)
