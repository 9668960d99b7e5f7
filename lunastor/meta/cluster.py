"""The cluster view behind `GET /v1/cluster`: a pure function of the records in etcd."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lunastor.common.records import (
    ChunkServerInfo,
    ChunkServerStatus,
    MetaInstance,
    RedirectorInstance,
)


def chunk_server_view(
    info: ChunkServerInfo | None, status: ChunkServerStatus | None, chunk_id: str
) -> dict[str, Any]:
    """One chunk server: its live status when its lease is alive, else its registration, down."""
    if status is not None:
        return {
            "id": chunk_id,
            "state": status.state,
            "zone": status.zone,
            "portal": status.portal,
            "data_address": status.data_address,
            "capacity": status.capacity,
            "free": status.free,
            "data_dirs": status.data_dirs,
            "version": status.version,
            "started_at": status.started_at,
        }
    assert info is not None
    return {
        "id": chunk_id,
        "state": "down",
        "zone": info.zone,
        "portal": info.portal,
        "data_address": info.data_address,
        "capacity": None,
        "free": None,
        "data_dirs": [],
        "version": None,
        "started_at": None,
    }


def cluster_view(
    infos: Iterable[ChunkServerInfo],
    statuses: Iterable[ChunkServerStatus],
    metas: Iterable[MetaInstance],
    redirectors: Iterable[RedirectorInstance],
    redirector_leader_id: str | None,
) -> dict[str, Any]:
    by_info = {i.id: i for i in infos}
    by_status = {s.id: s for s in statuses}
    chunks = [
        chunk_server_view(by_info.get(cid), by_status.get(cid), cid)
        for cid in sorted(by_info.keys() | by_status.keys())
    ]
    redirector_list = sorted(redirectors, key=lambda r: r.id)
    leader = next((r for r in redirector_list if r.id == redirector_leader_id), None)
    up = [c for c in chunks if c["state"] != "down"]
    return {
        "chunk_servers": chunks,
        "meta_instances": [
            {"id": m.id, "api_url": m.api_url, "version": m.version, "started_at": m.started_at}
            for m in sorted(metas, key=lambda m: m.id)
        ],
        "redirectors": [
            {"id": r.id, "vip": r.vip, "version": r.version, "leader": r.id == redirector_leader_id}
            for r in redirector_list
        ],
        "redirector_leader": (
            {"id": leader.id, "vip": leader.vip}
            if leader is not None
            else ({"id": redirector_leader_id, "vip": None} if redirector_leader_id else None)
        ),
        "summary": {
            "chunk_servers": len(chunks),
            "chunk_servers_up": len(up),
            "capacity": sum(c["capacity"] or 0 for c in up),
            "free": sum(c["free"] or 0 for c in up),
        },
    }
