"""GET /v1/cluster's view is a pure function of the records in etcd."""

from __future__ import annotations

import pytest

from lunastor.common.records import (
    ChunkServerInfo,
    ChunkServerStatus,
    MetaInstance,
    RecordError,
    RedirectorInstance,
)
from lunastor.meta.cluster import cluster_view


def _status(cid: str, state: str = "up", free: int = 50) -> ChunkServerStatus:
    return ChunkServerStatus(
        id=cid,
        portal=f"{cid}:3260",
        zone="z1",
        state=state,
        data_dirs=[{"path": "/d", "capacity": 100, "free": free}],
    )


def test_a_chunk_server_without_a_live_record_is_down() -> None:
    infos = [ChunkServerInfo(id=c, portal=f"{c}:3260", zone="z1") for c in ("a", "b", "c")]
    view = cluster_view(infos, [_status("a"), _status("c", "draining", 10)], [], [], None)
    assert [(c["id"], c["state"]) for c in view["chunk_servers"]] == [
        ("a", "up"),
        ("b", "down"),
        ("c", "draining"),
    ]
    assert view["chunk_servers"][1]["capacity"] is None
    assert view["summary"] == {
        "chunk_servers": 3,
        "chunk_servers_up": 2,
        "capacity": 200,
        "free": 60,
    }


def test_leader_and_instances() -> None:
    metas = [MetaInstance(id="m2", api_url="http://m2"), MetaInstance(id="m1", api_url="http://m1")]
    reds = [RedirectorInstance(id="r1", vip="v:3260"), RedirectorInstance(id="r2", vip="v:3260")]
    view = cluster_view([], [], metas, reds, "r2")
    assert [m["id"] for m in view["meta_instances"]] == ["m1", "m2"]
    assert view["redirector_leader"] == {"id": "r2", "vip": "v:3260"}
    assert [r["leader"] for r in view["redirectors"]] == [False, True]
    assert cluster_view([], [], [], [], None)["redirector_leader"] is None


def test_records_round_trip_and_refuse_unknown_versions() -> None:
    status = _status("a")
    assert ChunkServerStatus.from_json(status.to_json()) == status
    with pytest.raises(RecordError, match="unsupported format version 9"):
        ChunkServerStatus.from_json(b'{"v": 9, "id": "a"}')
    with pytest.raises(RecordError, match="not JSON"):
        ChunkServerStatus.from_json(b"\xff")
