"""The cluster's recent events: a short, time-ordered log in etcd (docs/dashboard.md, "Events").

Operators want to see *what happened* (a chunk server lost, a replica removed, a scrub repair,
a failover) next to *what is* (the records). Each event is one key under `Keys.EVENTS`, named
by its time in microseconds and a random suffix, so etcd's key order is time order and two
writers never collide. Writers only put; meta's planner leader prunes (`prune`) to the newest
`KEEP` events, so the prefix stays bounded whoever writes.

A daemon writes through its process's `EVENTS` log, bound once in its `main` (like the
Prometheus registry, it is process-wide so that a call site is one line and needs no handle
passed down to it). `emit()` never blocks and never raises: the put runs in a task, a failure
is logged and counted, and a burst beyond the rate limit is dropped and counted. An event is a
record for people; nothing in lunastor reads one to decide anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass

from prometheus_client import Counter

from lunastor.common.etcd import Delete, Etcd, EtcdError, KeyValue
from lunastor.common.logs import get_logger
from lunastor.common.records import Keys, Record, RecordError

KEEP = 1000  # events kept in etcd; older ones are pruned
PRUNE_BATCH = 100  # deletes per transaction (etcd's default limit is 128 operations)

# Every kind of event, its severity and what it means; `detail` adds the particulars.
KINDS: dict[str, tuple[str, str]] = {
    # meta: daemons coming and going (meta/events.py), operations (meta/planners.py)
    "chunk_server_joined": ("info", "a new chunk server registered and is up"),
    "chunk_server_up": ("info", "a chunk server is back"),
    "chunk_server_down": ("warning", "a chunk server stopped renewing its lease"),
    "meta_up": ("info", "a meta instance started"),
    "meta_down": ("warning", "a meta instance is gone"),
    "redirector_leader": ("info", "a redirector leads and holds the VIP"),
    "redirector_failover": ("warning", "another redirector took over the VIP"),
    "redirector_leader_lost": ("error", "no redirector leads: logins through the VIP fail"),
    "rebuild_started": ("warning", "re-replication of a lost server's extents began"),
    "rebuild_done": ("info", "every extent of a lost server has its replicas back"),
    "drain_started": ("info", "an operator asked to drain a chunk server"),
    "drain_done": ("info", "a drained chunk server holds no replica any more"),
    # chunk servers: the data path (subject: "<volume>/<extent>")
    "replica_removed": ("warning", "members left an extent's replica set (failed or dead)"),
    "replica_added": ("info", "a member joined an extent's replica set (rebuild, catch-up)"),
    "failover": ("warning", "an extent got a new primary: old -> new"),
    "locality_handover": ("info", "an extent's primary moved to the access point writing it"),
    "checksum_repair": ("warning", "a block failed its checksum on read; rewritten on this member"),
    "scrub_repair": ("warning", "scrub found a block failing its checksum and rewrote it"),
    "scrub_unrepaired": ("error", "scrub found a bad block it could not repair yet"),
    "data_dir_failed": ("error", "a data directory was taken out of service"),
}

EMITTED = Counter("lunastor_events_total", "Events written to the cluster's event log", ["kind"])
DROPPED = Counter(
    "lunastor_events_dropped_total", "Events not written (rate limit, no etcd)", ["reason"]
)

log = get_logger(component="events")


@dataclass
class EventRecord(Record):
    at: float = 0.0  # seconds since the epoch, on the writer's clock
    kind: str = ""  # a key of `KINDS`
    severity: str = "info"  # info | warning | error
    subject: str = ""  # what it is about: a chunk server id, "<volume>/<extent>", ...
    detail: str = ""  # one sentence for people
    source: str = ""  # who wrote it: a chunk server id, a meta instance id


def event_key(at: float) -> str:
    return f"{Keys.EVENTS}{round(at * 1e6):017d}-{secrets.token_hex(4)}"


def event_view(kv: KeyValue) -> dict[str, object] | None:
    try:
        e = EventRecord.from_json(kv.value)
    except RecordError:
        return None
    return {
        "id": kv.key.removeprefix(Keys.EVENTS),
        "at": e.at,
        "kind": e.kind,
        "severity": e.severity,
        "what": KINDS.get(e.kind, ("", ""))[1],
        "subject": e.subject,
        "detail": e.detail,
        "source": e.source,
    }


async def recent(etcd: Etcd, limit: int) -> list[dict[str, object]]:
    """The newest `limit` events, newest first (the prefix holds at most about `KEEP`)."""
    kvs, _ = await etcd.get_prefix(Keys.EVENTS)
    out = []
    for kv in reversed(kvs):
        view = event_view(kv)
        if view is not None:
            out.append(view)
            if len(out) == limit:
                break
    return out


async def prune(etcd: Etcd, keep: int = KEEP) -> int:
    """Delete all but the newest `keep` events; returns how many went."""
    kvs, _ = await etcd.get_prefix(Keys.EVENTS)
    old = [kv.key for kv in kvs[: max(0, len(kvs) - keep)]]
    for i in range(0, len(old), PRUNE_BATCH):
        await etcd.txn([], [Delete(k) for k in old[i : i + PRUNE_BATCH]])
    return len(old)


class EventLog:
    """Where this process writes events. Unbound (before `bind`, or in a test that never binds
    it) it writes nothing, so library code can emit without knowing whether it runs in a
    daemon."""

    def __init__(self, rate: float = 5.0, burst: int = 50) -> None:
        self.rate = rate
        self.burst = burst
        self._etcd: Etcd | None = None
        self._source = ""
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._tasks: set[asyncio.Task[None]] = set()

    def bind(self, etcd: Etcd, source: str) -> None:
        self._etcd, self._source = etcd, source

    async def unbind(self) -> None:
        """Stop writing; wait for the puts in flight (a daemon calls it before closing etcd)."""
        self._etcd = None
        tasks = list(self._tasks)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def emit(self, kind: str, subject: str, detail: str) -> None:
        """Write an event in the background; never blocks, never raises."""
        if self._etcd is None:
            return
        if not self._take():
            DROPPED.labels("rate_limit").inc()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called off the event loop (a thread): not written
            DROPPED.labels("no_loop").inc()
            return
        task = loop.create_task(self._put(self._etcd, kind, subject, detail), name="event")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def write(self, kind: str, subject: str, detail: str) -> None:
        """Write an event and wait for it (planners, tests); a failure is logged, not raised."""
        if self._etcd is not None:
            await self._put(self._etcd, kind, subject, detail)

    async def _put(self, etcd: Etcd, kind: str, subject: str, detail: str) -> None:
        severity = KINDS[kind][0]
        now = time.time()
        record = EventRecord(now, kind, severity, subject, detail, self._source)
        try:
            await etcd.put(event_key(now), record.to_json())
        except EtcdError as exc:
            DROPPED.labels("etcd").inc()
            log.warning("event not written", kind=kind, subject=subject, error=str(exc))
            return
        EMITTED.labels(kind).inc()

    def _take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


EVENTS = EventLog()  # this process's event log; each daemon's main binds it to its etcd
