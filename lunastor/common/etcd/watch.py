"""Prefix watches that survive endpoint failures and compaction.

Each `watch_prefix` owns one gRPC Watch stream. It remembers the revision after the last event
it yielded, and when the stream breaks it opens a new one (on the next endpoint if this one
failed) starting exactly there: events are neither lost nor repeated, because etcd never
splits one revision across two watch responses. When that revision was compacted it re-lists
the prefix and yields a `WatchResync`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
from aetcd import rpc

from lunastor.common.etcd.client import channel_closed_under_us
from lunastor.common.etcd.errors import (
    EtcdRequestError,
    EtcdTokenExpired,
    EtcdUnavailable,
    error_from_status,
)
from lunastor.common.etcd.model import EventType, WatchEvent, WatchItem, WatchResync

if TYPE_CHECKING:
    from lunastor.common.etcd.client import Etcd

log = logging.getLogger(__name__)

_MIN_BACKOFF = 0.05
_MAX_BACKOFF = 1.0
# Ask etcd to end the stream when the member loses its raft leader, instead of leaving us on
# a member that can no longer deliver events (clientv3.WithRequireLeader).
_REQUIRE_LEADER = (("hasleader", "true"),)


class _StreamBroken(Exception):
    """The stream ended or was cancelled by etcd for a reason worth retrying."""


async def watch_prefix(
    etcd: Etcd, prefix: str, start_revision: int | None, deletes_only: bool = False
) -> AsyncIterator[WatchItem]:
    start, end = etcd.keys.prefix_range(prefix)
    if start_revision is None:
        next_rev = await etcd.revision() + 1
    elif not isinstance(start_revision, int) or isinstance(start_revision, bool):
        raise EtcdRequestError(f"start_revision must be an int, not {start_revision!r}")
    elif start_revision <= 0:
        raise EtcdRequestError(f"start_revision must be positive, not {start_revision}")
    else:
        next_rev = start_revision
    backoff = _MIN_BACKOFF
    while True:
        try:
            conn = await etcd._connection()
        except EtcdUnavailable as exc:
            log.info("watch %r: %s; retrying", prefix, exc)
            await etcd._skip_endpoint()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)
            continue
        call = conn.watch.Watch(metadata=conn.metadata + _REQUIRE_LEADER)
        try:
            create = rpc.WatchCreateRequest(
                key=start,
                range_end=end,
                start_revision=next_rev,
                # etcd drops filtered events before sending and sends nothing for a revision
                # left empty: a deletes-only watcher pays nothing for the puts it skips
                filters=[rpc.WatchCreateRequest.NOPUT] if deletes_only else [],
            )
            await call.write(rpc.WatchRequest(create_request=create))
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise _StreamBroken("watch stream ended")
                if resp.compact_revision:
                    log.info(
                        "watch %r: revision %d compacted (oldest %d); re-listing",
                        prefix,
                        next_rev,
                        resp.compact_revision,
                    )
                    kvs, rev = await etcd.get_prefix(prefix)
                    next_rev = rev + 1
                    yield WatchResync(kvs, rev)
                    break  # a fresh stream from next_rev
                if resp.canceled:
                    reason = resp.cancel_reason or "watch cancelled by etcd"
                    err = error_from_status(grpc.StatusCode.UNAVAILABLE, reason, conn.endpoint)
                    if isinstance(err, EtcdTokenExpired):
                        await etcd._authenticate(conn)
                    elif not isinstance(err, EtcdUnavailable):
                        raise err
                    raise _StreamBroken(reason)
                for ev in resp.events:
                    kv = etcd.keys.kv(ev.kv)
                    kind = EventType.DELETE if ev.type == rpc.Event.DELETE else EventType.PUT
                    next_rev = kv.mod_revision + 1
                    yield WatchEvent(kind, kv, kv.mod_revision)
                backoff = _MIN_BACKOFF
            continue
        except asyncio.CancelledError:
            if not channel_closed_under_us():
                raise
            log.info(
                "watch %r: channel to %s closed; resuming at %d", prefix, conn.endpoint, next_rev
            )
        except _StreamBroken as exc:
            log.info("watch %r on %s: %s; resuming at %d", prefix, conn.endpoint, exc, next_rev)
        except grpc.aio.AioRpcError as exc:
            err = error_from_status(exc.code(), exc.details() or "", conn.endpoint)
            if isinstance(err, EtcdTokenExpired):
                await etcd._authenticate(conn)
            elif isinstance(err, EtcdUnavailable):
                log.info("watch %r: %s; resuming at %d", prefix, err, next_rev)
                await etcd._failover(conn)
            else:
                raise err from exc
        finally:
            call.cancel()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, _MAX_BACKOFF)
