"""Which chunk servers may receive initiators: live, not draining, with a portal.

A chunk server is healthy while its lease-bound live record (`/v1/live/chunks/<id>`) exists;
the operator's drain (`/v1/chunk-admin/<id>`, state draining or drained, written by meta) or
the server's own "draining" state takes it out of new redirects. Servers that are not "up"
still appear in the table as such, so that `choose_chunk_server` sees every id and a drain
moves only the initiators of the drained server.

`ServerTable.build` is pure (table-tested); `ChunkServers` keeps it current with two
`PrefixCache`s and rebuilds it only when one of them moved on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lunastor.common.etcd import Etcd, PrefixCache
from lunastor.common.records import ChunkAdminRecord, ChunkServerStatus, Keys, RecordError
from lunastor.redirector.choose import ServerChoice

log = logging.getLogger(__name__)
DRAIN_STATES = ("draining", "drained")


@dataclass(frozen=True)
class ServerTable:
    choices: tuple[ServerChoice, ...] = ()
    portals: Mapping[str, str] = field(default_factory=dict)  # id -> advertised "host:port"
    bad_records: tuple[str, ...] = ()

    @classmethod
    def build(
        cls, live: Iterable[tuple[str, bytes]], admin: Iterable[tuple[str, bytes]] = ()
    ) -> ServerTable:
        bad: list[str] = []
        drained: set[str] = set()
        for key, value in admin:
            try:
                record = ChunkAdminRecord.from_json(value)
            except RecordError as exc:
                bad.append(f"{key}: {exc}")
                continue
            if record.state in DRAIN_STATES:
                drained.add(key.removeprefix(Keys.CHUNK_ADMIN))
        choices: list[ServerChoice] = []
        portals: dict[str, str] = {}
        for key, value in live:
            server_id = key.removeprefix(Keys.LIVE_CHUNKS)
            try:
                status = ChunkServerStatus.from_json(value)
            except RecordError as exc:
                bad.append(f"{key}: {exc}")
                continue
            if not server_id or not isinstance(status.portal, str) or not status.portal:
                bad.append(f"{key}: no portal advertised")
                continue
            up = status.state == "up" and server_id not in drained
            choices.append(ServerChoice(server_id, "up" if up else "draining"))
            portals[server_id] = status.portal
        choices.sort(key=lambda c: c.id)
        return cls(tuple(choices), portals, tuple(bad))

    @property
    def up(self) -> list[str]:
        return [c.id for c in self.choices if c.state == "up"]


class ChunkServers:
    """The live `ServerTable`: `await ChunkServers(etcd).start()`, then `servers.table`."""

    def __init__(self, etcd: Etcd) -> None:
        self.live = PrefixCache(etcd, Keys.LIVE_CHUNKS)
        self.admin = PrefixCache(etcd, Keys.CHUNK_ADMIN)
        self._table = ServerTable()
        self._built_at = (-1, -1)

    async def start(self) -> ChunkServers:
        await self.live.start()
        await self.admin.start()
        return self

    async def stop(self) -> None:
        await self.live.stop()
        await self.admin.stop()

    @property
    def error(self) -> BaseException | None:
        """Why following etcd stopped for good (the table is then stale), or None."""
        return self.live.error or self.admin.error

    @property
    def table(self) -> ServerTable:
        revisions = (self.live.revision, self.admin.revision)
        if revisions != self._built_at:
            self._table = ServerTable.build(_values(self.live.items), _values(self.admin.items))
            self._built_at = revisions
            for bad in self._table.bad_records:
                log.warning("ignoring an unreadable chunk server record: %s", bad)
        return self._table


def _values(items: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    return [(key, kv.value) for key, kv in items.items()]
