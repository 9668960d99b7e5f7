"""`GET /v1/events`, and the planners that keep the event log (`lunastor.common.events`):
`PresenceEvents` reports daemons coming and going, `EventPruner` keeps the log bounded.

Both run on the planner leader (planners.py). `PresenceEvents` compares the live records with
what its previous pass saw: a chunk server or meta instance whose lease record went away is
down, one that is back is up, a new redirector leader is a failover. Its first pass after
taking the lead only looks (it cannot know what changed before), so a change made while no
meta instance led is not reported; the records themselves still show the state.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from aiohttp import web

from lunastor.common import events
from lunastor.common.etcd import Etcd, KeyValue
from lunastor.common.events import EVENTS
from lunastor.common.records import (
    ChunkServerInfo,
    ChunkServerStatus,
    Keys,
    MetaInstance,
    RecordError,
    RedirectorInstance,
)
from lunastor.meta.context import ETCD_KEY
from lunastor.meta.routing import ALL_ROLES, Call, Param, Route, json_response

LIMIT = {"type": "integer", "minimum": 1, "maximum": events.KEEP}
PRUNE_EVERY = 30.0  # seconds between prunes (each reads the whole, bounded, prefix)


async def list_events(call: Call) -> web.Response:
    limit = call.params.get("limit", 100)
    items = await events.recent(call.app[ETCD_KEY], limit)
    return json_response({"items": items})


def _ids(kvs: list[KeyValue], cls: Any) -> dict[str, Any]:
    out = {}
    for kv in kvs:
        with contextlib.suppress(RecordError):
            record = cls.from_json(kv.value)
            out[record.id] = record
    return out


class PresenceEvents:
    name = "presence-events"

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self._seen: tuple[dict[str, Any], set[str], set[str], str | None] | None = None

    async def run_once(self) -> None:
        infos, rev = await self.etcd.get_prefix(Keys.CHUNKS)
        lives, _ = await self.etcd.get_prefix(Keys.LIVE_CHUNKS, revision=rev)
        metas, _ = await self.etcd.get_prefix(Keys.LIVE_META, revision=rev)
        leaders, _ = await self.etcd.get_prefix(Keys.REDIRECTOR_ELECTION + "/", revision=rev)
        redirectors, _ = await self.etcd.get_prefix(Keys.LIVE_REDIRECTORS, revision=rev)
        registered = _ids(infos, ChunkServerInfo)
        live = set(_ids(lives, ChunkServerStatus))
        meta = set(_ids(metas, MetaInstance))
        first = min(leaders, key=lambda kv: kv.create_revision, default=None)
        leader = first.value.decode(errors="replace") if first is not None else None
        seen, self._seen = self._seen, (registered, live, meta, leader)
        if seen is None:
            return
        was_registered, was_live, was_meta, was_leader = seen
        for cid in sorted(was_live - live):
            info = registered.get(cid)
            where = f"zone {info.zone}, portal {info.portal}" if info is not None else "unknown"
            await EVENTS.write("chunk_server_down", cid, where)
        for cid in sorted(live - was_live):
            await EVENTS.write(
                "chunk_server_up" if cid in was_registered else "chunk_server_joined", cid, ""
            )
        for mid in sorted(was_meta - meta):
            await EVENTS.write("meta_down", mid, "")
        for mid in sorted(meta - was_meta):
            await EVENTS.write("meta_up", mid, "")
        if leader == was_leader:
            return
        if leader is None:
            await EVENTS.write("redirector_leader_lost", was_leader or "", "")
            return
        vip = _ids(redirectors, RedirectorInstance).get(leader)
        detail = f"VIP {vip.vip}" if vip is not None else ""
        if was_leader:
            await EVENTS.write("redirector_failover", leader, f"{detail} (was {was_leader})")
        else:
            await EVENTS.write("redirector_leader", leader, detail)


class EventPruner:
    name = "event-pruner"

    def __init__(self, etcd: Etcd, keep: int = events.KEEP, every: float = PRUNE_EVERY) -> None:
        self.etcd = etcd
        self.keep = keep
        self.every = every
        self._last = 0.0

    async def run_once(self) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            return
        self._last = now
        await events.prune(self.etcd, self.keep)


ROUTES = [
    Route(
        "GET",
        "/v1/events",
        list_events,
        "listEvents",
        "Recent cluster events, newest first (chunk servers lost and back, replicas removed "
        "and added, repairs, failovers, drains and rebuilds)",
        "cluster",
        ALL_ROLES,
        params=(Param("limit", "query", LIMIT, "how many (default 100)"),),
        responses={200: "EventList"},
    ),
]
