"""`GET /v1/volume-status` and `GET /v1/volumes/{id}/status`: what each volume's data is doing
now (health, where it is served) and, for one volume, its extents' replica placement.

Read from the records the data path keeps, at one etcd revision: the extent map (members,
generation, converging), the chunk servers' live records and drain intents, the LUN map
(exports) and the nexus epochs (`Keys.NEXUS_EPOCHS`: one key per iSCSI session alive, naming
the access point it is logged in to). Health is `volume_health.volume_health`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from lunastor.common.etcd import Etcd, KeyValue
from lunastor.common.extent_pages import extent_records
from lunastor.common.records import (
    ChunkAdminRecord,
    ChunkServerInfo,
    ChunkServerStatus,
    ClusterConfigRecord,
    ExtentRecord,
    Keys,
    LunRecord,
    OperationRecord,
    R,
    ScrubErrorsRecord,
    VolumeRecord,
    decode_records,
)
from lunastor.meta.context import ETCD_KEY
from lunastor.meta.problems import Problem
from lunastor.meta.routing import ALL_ROLES, Call, Route, json_response
from lunastor.meta.volume_health import Servers, extent_health, volume_health
from lunastor.meta.volumes import VOLUME_ID


def sessions(nexus_kvs: list[KeyValue]) -> dict[str, list[tuple[str, str]]]:
    """target IQN -> [(initiator IQN, access point chunk id)] of the iSCSI sessions alive."""
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for kv in nexus_kvs:
        target, sep, port = kv.key.removeprefix(Keys.NEXUS_EPOCHS).partition("/")
        if not sep:
            continue
        # an initiator port is "<initiator name>,i,0x<ISID>" (RFC 7143 10.12.5)
        initiator = unquote(port).partition(",i,")[0].lower()
        out[unquote(target)].append((initiator, kv.value.decode(errors="replace")))
    return out


def served_by(
    target: str, lun: LunRecord | None, live_sessions: dict[str, list[tuple[str, str]]]
) -> list[dict[str, str]]:
    """The sessions that see this LUN: its target's, from initiators in its ACL."""
    allowed = set(lun.initiators) if lun is not None else set()
    return [
        {"chunk_id": chunk, "initiator": initiator}
        for initiator, chunk in sorted(live_sessions.get(target, []))
        if initiator in allowed
    ]


@dataclass(frozen=True)
class ChunkStates:
    """Each known chunk server's state as the dashboard shows it (up, draining or down), and
    the servers as the health rules need them."""

    states: dict[str, str]
    zones: dict[str, str]
    servers: Servers

    @classmethod
    def of(
        cls,
        infos: list[ChunkServerInfo],
        lives: list[ChunkServerStatus],
        admins: list[ChunkAdminRecord],
        operations: list[OperationRecord],
        now: float,
    ) -> ChunkStates:
        """`operations`: a running `rebuild` operation is created when its server is found
        lost, so its start is when the repair loops' `replace_after` wait began."""
        zones = {i.id: i.zone for i in infos}
        states = dict.fromkeys(zones, "down")
        for s in lives:
            states[s.id] = "draining" if s.state == "draining" else "up"
            zones[s.id] = s.zone
        for a in admins:
            if a.state == "draining" and states.get(a.id) == "up":
                states[a.id] = "draining"
        replace_after = max((s.replace_after for s in lives), default=0.0)
        waiting = {
            op.subject
            for op in operations
            if op.kind == "rebuild"
            and op.state == "running"
            and states.get(op.subject, "down") == "down"
            and now - op.created_at < replace_after
        }
        planned = {o.subject for o in operations if o.kind == "rebuild" and o.state == "running"}
        servers = Servers(
            live=frozenset(c for c, s in states.items() if s != "down"),
            draining=frozenset(c for c, s in states.items() if s == "draining"),
            waiting_for=frozenset(waiting),
            unplanned=frozenset(c for c, s in states.items() if s == "down" and c not in planned),
        )
        return cls(states, zones, servers)


async def _read_cluster(etcd: Etcd, revision: int) -> tuple[ChunkStates, dict[str, Any]]:
    infos, _ = await etcd.get_prefix(Keys.CHUNKS, revision=revision)
    lives, _ = await etcd.get_prefix(Keys.LIVE_CHUNKS, revision=revision)
    admins, _ = await etcd.get_prefix(Keys.CHUNK_ADMIN, revision=revision)
    ops, _ = await etcd.get_prefix(Keys.OPERATIONS, revision=revision)
    nexus, _ = await etcd.get_prefix(Keys.NEXUS_EPOCHS, revision=revision)
    chunks = ChunkStates.of(
        decode_records(infos, ChunkServerInfo),
        decode_records(lives, ChunkServerStatus),
        decode_records(admins, ChunkAdminRecord),
        decode_records(ops, OperationRecord),
        time.time(),
    )
    return chunks, sessions(nexus)


async def list_volume_status(call: Call) -> web.Response:
    etcd = call.app[ETCD_KEY]
    vol_kvs, rev = await etcd.get_prefix(Keys.VOLUMES)
    lun_kvs, _ = await etcd.get_prefix(Keys.LUNS, revision=rev)
    ext_kvs, _ = await etcd.get_prefix(Keys.EXTENTS, revision=rev)
    chunks, live_sessions = await _read_cluster(etcd, rev)
    luns = {lun.volume_id: lun for lun in decode_records(lun_kvs, LunRecord)}
    extents: dict[str, list[ExtentRecord]] = defaultdict(list)
    for rec in extent_records(ext_kvs):
        extents[rec.volume].append(rec)  # a snapshot's preserved copies are named apart
    servers = chunks.servers
    items = []
    for vol in sorted(decode_records(vol_kvs, VolumeRecord), key=lambda v: v.name):
        lun = luns.get(vol.id)
        health = volume_health(extents.get(vol.id, []), vol.replicas, servers)
        serving = served_by(vol.target_iqn, lun, live_sessions)
        items.append(
            {
                "volume_id": vol.id,
                **health.view(),
                "served_by": sorted({s["chunk_id"] for s in serving}),
                "exports": len(lun.initiators) if lun is not None else 0,
            }
        )
    return json_response({"items": items, "revision": rev})


async def _get_at(etcd: Etcd, key: str, cls: type[R], revision: int) -> R | None:
    """The record at `key` as of `revision` (a prefix read, keeping the exact key only)."""
    kvs, _ = await etcd.get_prefix(key, revision=revision)
    found = decode_records([kv for kv in kvs if kv.key == key], cls)
    return found[0] if found else None


def scrub_errors(
    volume_id: str, extents: list[ExtentRecord], found: list[ScrubErrorsRecord]
) -> int:
    """Blocks of the volume that its members' latest scrub passes found bad and could not
    repair; a server that is no longer a member of the extent no longer counts."""
    members = {rec.index: set(rec.replicas) for rec in extents}
    return sum(
        1
        for rec in found
        for volume, index, _ in rec.blocks
        if volume == volume_id and rec.chunk_id in members.get(index, ())
    )


async def get_volume_status(call: Call) -> web.Response:
    etcd = call.app[ETCD_KEY]
    volume_id = call.params["volume_id"]
    rev = await etcd.revision()  # every read below is of this one revision
    vol = await _get_at(etcd, Keys.volume(volume_id), VolumeRecord, rev)
    if vol is None:
        raise Problem(404, "volume_not_found", f"no volume {volume_id}")
    lun = await _get_at(etcd, Keys.lun(vol.target, vol.lun), LunRecord, rev)
    if lun is not None and lun.volume_id != vol.id:
        lun = None
    config = await _get_at(etcd, Keys.CLUSTER_CONFIG, ClusterConfigRecord, rev)
    ext_kvs, _ = await etcd.get_prefix(Keys.volume_extents(vol.id), revision=rev)
    chunks, live_sessions = await _read_cluster(etcd, rev)
    records = sorted(extent_records(ext_kvs), key=lambda r: r.index)
    servers = chunks.servers.seeing(records)
    health = volume_health(records, vol.replicas, servers)
    scrub_kvs, _ = await etcd.get_prefix(Keys.SCRUB_ERRORS, revision=rev)
    bad_blocks = scrub_errors(vol.id, records, decode_records(scrub_kvs, ScrubErrorsRecord))
    extents = [
        {
            "index": rec.index,
            "gen": rec.gen,
            "converging": rec.converging,
            "health": str(extent_health(rec, vol.replicas, servers)),
            "replicas": [
                {
                    "chunk_id": m,
                    "state": chunks.states.get(m, "down"),
                    "zone": chunks.zones.get(m, ""),
                }
                for m in rec.replicas
            ],
        }
        for rec in records
    ]
    return json_response(
        {
            "volume_id": vol.id,
            **health.view(),
            "served_by": served_by(vol.target_iqn, lun, live_sessions),
            "exports": len(lun.initiators) if lun is not None else 0,
            "extent_size": config.extent_size if config is not None else None,
            "scrub_errors": bad_blocks,
            "extent_map": extents,
            "revision": rev,
        }
    )


ROUTES = [
    Route(
        "GET",
        "/v1/volume-status",
        list_volume_status,
        "listVolumeStatus",
        "Every volume's health (ok, degraded, rebuilding, unavailable), access points serving "
        "it and export count, read at one etcd revision",
        "volumes",
        ALL_ROLES,
        responses={200: "VolumeStatusList"},
    ),
    Route(
        "GET",
        "/v1/volumes/{volume_id}/status",
        get_volume_status,
        "getVolumeStatus",
        "One volume's health, the sessions serving it and its extents' replica placement",
        "volumes",
        ALL_ROLES,
        params=(VOLUME_ID,),
        responses={200: "VolumeStatus"},
    ),
]
