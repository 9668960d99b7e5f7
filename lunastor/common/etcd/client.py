"""`Etcd`: the one asyncio client every lunastor daemon uses to talk to etcd.

Built on aetcd's generated gRPC stubs (`aetcd.rpc`) rather than `aetcd.Client`, because the
latter has no TLS, one endpoint only, and no `limit` on ranges. Requests go to one endpoint
at a time; when it is unreachable the client moves to the next one (see `_call`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from aetcd import rpc

from lunastor.common.etcd.config import CHANNEL_OPTIONS, EtcdConfig
from lunastor.common.etcd.errors import (
    EtcdClosed,
    EtcdError,
    EtcdLeaseNotFound,
    EtcdRequestError,
    EtcdTokenExpired,
    EtcdUnavailable,
    error_from_status,
    never_sent,
)
from lunastor.common.etcd.model import (
    Compare,
    Delete,
    Get,
    Keyspace,
    KeyValue,
    Op,
    OpResult,
    Page,
    Put,
    TxnResult,
    WatchItem,
    check_value,
)

log = logging.getLogger(__name__)

_OPS = {"==": rpc.Compare.EQUAL, "!=": rpc.Compare.NOT_EQUAL, "<": rpc.Compare.LESS}
_OPS[">"] = rpc.Compare.GREATER
_TARGET_FIELD = {0: "version", 1: "create_revision", 2: "mod_revision", 3: "value", 4: "lease"}


@dataclass
class _Conn:
    """One gRPC channel to one endpoint, with its stubs and auth token."""

    endpoint: str
    channel: Any
    kv: Any
    lease: Any
    watch: Any
    maintenance: Any
    metadata: tuple[tuple[str, str], ...] = ()


def open_channel(config: EtcdConfig, endpoint: str, aio: bool = True) -> Any:
    """A gRPC channel to `endpoint`: asyncio (`aio`) or blocking, TLS when configured."""
    creds = config.credentials()
    mod: Any = grpc.aio if aio else grpc
    if creds is None:
        return mod.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
    return mod.secure_channel(endpoint, creds, options=CHANNEL_OPTIONS)


class Etcd:
    """An etcd client scoped to `config.namespace`. Use `await Etcd.connect(config)`."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self.keys = Keyspace(config.namespace)
        self._index = 0
        self._conn: _Conn | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        # Channels of failed-over endpoints, closing in the background (see `_failover`),
        # and the tasks closing them (held here: the loop keeps only weak references).
        self._retired: set[Any] = set()
        self._closers: set[asyncio.Task[None]] = set()

    @classmethod
    async def connect(cls, config: EtcdConfig) -> Etcd:
        """Connect (authenticating if configured) to the first endpoint that answers."""
        etcd = cls(config)
        try:
            await etcd._call("maintenance", "Status", rpc.StatusRequest(), idempotent=True)
        except BaseException:
            await etcd.close()
            raise
        return etcd

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.channel.close()
        for channel in list(self._retired):
            await channel.close()  # no grace: we are done
        self._retired.clear()
        await asyncio.gather(*self._closers, return_exceptions=True)

    async def __aenter__(self) -> Etcd:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def endpoint(self) -> str:
        """The endpoint requests currently go to."""
        return self.config.endpoints[self._index]

    # --- connection management --------------------------------------------------------

    async def _connection(self) -> _Conn:
        if self._closed:
            raise EtcdClosed("etcd client is closed")
        if self._conn is not None:  # the common case, without the lock's bookkeeping
            return self._conn
        async with self._lock:
            if self._conn is not None:
                return self._conn
            endpoint = self.endpoint
            channel = open_channel(self.config, endpoint)
            conn = _Conn(
                endpoint=endpoint,
                channel=channel,
                kv=rpc.KVStub(channel),
                lease=rpc.LeaseStub(channel),
                watch=rpc.WatchStub(channel),
                maintenance=rpc.MaintenanceStub(channel),
            )
            try:
                await self._authenticate(conn)
            except BaseException:
                await channel.close()
                raise
            self._conn = conn
            return conn

    async def _authenticate(self, conn: _Conn) -> None:
        if self.config.user is None:
            return
        request = rpc.AuthenticateRequest(name=self.config.user, password=self.config.password)
        try:
            resp = await rpc.AuthStub(conn.channel).Authenticate(
                request, timeout=self.config.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_status(exc.code(), exc.details() or "", conn.endpoint) from exc
        conn.metadata = (("token", resp.token),)

    async def _failover(self, conn: _Conn) -> None:
        """Drop `conn` (if still current) and point the next request at the next endpoint."""
        async with self._lock:
            if self._conn is not conn:
                return  # someone else already moved on
            self._conn = None
            self._index = (self._index + 1) % len(self.config.endpoints)
        log.info("etcd endpoint %s failed; next: %s", conn.endpoint, self.endpoint)
        # Other requests may still be in flight on this channel (and succeed, if the endpoint
        # only hiccuped): give them the request timeout before closing cancels them.
        self._retired.add(conn.channel)
        closer = asyncio.create_task(self._close_later(conn.channel))
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)

    async def _close_later(self, channel: Any) -> None:
        try:
            await channel.close(grace=self.config.timeout)
        finally:
            self._retired.discard(channel)

    async def _call(self, stub: str, method: str, request: Any, *, idempotent: bool) -> Any:
        """One unary RPC with failover.

        Reads (`idempotent`) are retried once on every endpoint (twice on a lone endpoint).
        A write is retried on another endpoint only when it surely was not sent; otherwise the
        client still moves to the next endpoint and the write fails with `EtcdUnavailable`,
        since retrying it could apply it twice.
        """
        # Every endpoint once, and with a single endpoint a second try on a fresh channel
        # (the first failure may have been a stale connection to a restarted etcd).
        attempts = max(2, len(self.config.endpoints))
        reauthed = False
        last: EtcdError | None = None
        while attempts > 0:
            try:
                conn = await self._connection()
            except EtcdUnavailable as exc:  # authenticating failed: nothing was sent
                last = exc
                await self._skip_endpoint()
                attempts -= 1
                continue
            try:
                return await getattr(getattr(conn, stub), method)(
                    request, timeout=self.config.timeout, metadata=conn.metadata
                )
            except asyncio.CancelledError:
                if not channel_closed_under_us():
                    raise
                # Our task was not cancelled: the channel was retired while this request was
                # in flight. It may have been applied, so only reads are retried.
                gone = EtcdUnavailable(f"etcd {conn.endpoint}: channel closed during failover")
                if not idempotent:
                    raise gone from None
                last = gone
                attempts -= 1
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                err = error_from_status(code, details, conn.endpoint)
                if isinstance(err, EtcdTokenExpired) and not reauthed:
                    reauthed = True
                    await self._authenticate(conn)
                    continue
                if not isinstance(err, EtcdUnavailable):
                    raise err from exc
                await self._failover(conn)
                if not (idempotent or never_sent(code, details)):
                    raise err from exc
                last = err
                attempts -= 1
        assert last is not None
        raise last

    async def _skip_endpoint(self) -> None:
        async with self._lock:
            self._index = (self._index + 1) % len(self.config.endpoints)

    # --- reads ---------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        resp = await self._call(
            "kv", "Range", rpc.RangeRequest(key=self.keys.encode(key)), idempotent=True
        )
        return self.keys.kv(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(
        self, prefix: str, *, page_size: int = 1000, revision: int | None = None
    ) -> tuple[list[KeyValue], int]:
        """Every key under `prefix` and the revision they were read at (one snapshot)."""
        kvs: list[KeyValue] = []
        rev = 0
        async for page in self.iter_prefix(prefix, page_size=page_size, revision=revision):
            kvs.extend(page.kvs)
            rev = page.revision
        return kvs, rev

    async def iter_prefix(
        self, prefix: str, *, page_size: int = 1000, revision: int | None = None
    ) -> AsyncIterator[Page]:
        """Pages of keys under `prefix`; every page is read at the first page's revision."""
        start_after: str | None = None
        while True:
            page = await self.get_page(prefix, start_after, page_size, revision)
            revision = page.revision
            yield page
            if not page.more:
                return
            start_after = page.last_key

    async def get_page(
        self, prefix: str, start_after: str | None, limit: int, revision: int | None = None
    ) -> Page:
        """Up to `limit` keys under `prefix` strictly after `start_after`, read at `revision`
        (the current revision when None). Raises `EtcdCompacted` if `revision` is gone."""
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            raise EtcdRequestError(f"page limit must be a positive int, not {limit!r}")
        if revision is not None and (not isinstance(revision, int) or revision <= 0):
            raise EtcdRequestError(f"revision must be a positive int, not {revision!r}")
        start, end = self.keys.prefix_range(prefix)
        if start_after is not None:
            if not isinstance(start_after, str) or not start_after.startswith(prefix):
                raise EtcdRequestError(f"start_after {start_after!r} is not under {prefix!r}")
            start = self.keys.encode(start_after) + b"\0"
        request = rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision or 0)
        resp = await self._call("kv", "Range", request, idempotent=True)
        kvs = [self.keys.kv(kv) for kv in resp.kvs]
        return Page(kvs=kvs, revision=revision or resp.header.revision, more=resp.more)

    async def revision(self) -> int:
        """The store's current revision."""
        start, end = self.keys.prefix_range("")
        request = rpc.RangeRequest(key=start, range_end=end, count_only=True)
        resp = await self._call("kv", "Range", request, idempotent=True)
        return int(resp.header.revision)

    async def newest_revision(self, prefix: str) -> int:
        """The highest mod revision of the keys under `prefix` now (0: none). A follower of
        the prefix that has applied this revision holds every key there as of now (keys
        deleted since may still be in it)."""
        start, end = self.keys.prefix_range(prefix)
        request = rpc.RangeRequest(
            key=start,
            range_end=end,
            limit=1,
            keys_only=True,
            sort_order=rpc.RangeRequest.DESCEND,
            sort_target=rpc.RangeRequest.MOD,
        )
        resp = await self._call("kv", "Range", request, idempotent=True)
        return int(resp.kvs[0].mod_revision) if resp.kvs else 0

    # --- writes --------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        """Write `key`; returns the revision of the write."""
        request = rpc.PutRequest(
            key=self.keys.encode(key), value=check_value(value), lease=_lease_id(lease)
        )
        resp = await self._call("kv", "Put", request, idempotent=False)
        return int(resp.header.revision)

    async def delete(self, key: str) -> bool:
        """Delete `key`; True if it existed."""
        request = rpc.DeleteRangeRequest(key=self.keys.encode(key))
        resp = await self._call("kv", "DeleteRange", request, idempotent=False)
        return bool(resp.deleted)

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix`; returns how many there were."""
        start, end = self.keys.prefix_range(prefix)
        request = rpc.DeleteRangeRequest(key=start, range_end=end)
        resp = await self._call("kv", "DeleteRange", request, idempotent=False)
        return int(resp.deleted)

    async def create(self, key: str, value: bytes, lease: int | None = None) -> bool:
        """Write `key` only if it does not exist; True if this call created it."""
        result = await self.txn([Compare.version(key) == 0], [Put(key, value, lease)], [])
        return result.succeeded

    async def txn(
        self, compares: list[Compare], success: list[Op], failure: list[Op] | None = None
    ) -> TxnResult:
        """If every compare holds run `success`, else `failure`; atomically."""
        failure = failure or []
        # Built in place (`add()`, then fields): a message given to a constructor is copied
        # into its parent, and that took half of building a txn (meta sends one per REST call).
        request = rpc.TxnRequest()
        for c in compares:
            self._compare(c, request.compare.add())
        for op in success:
            self._op(op, request.success.add())
        for op in failure:
            self._op(op, request.failure.add())
        resp = await self._call("kv", "Txn", request, idempotent=False)
        ops = success if resp.succeeded else failure
        results: list[OpResult] = []
        for op, r in zip(ops, resp.responses, strict=True):
            if isinstance(op, Get):
                results.append([self.keys.kv(kv) for kv in r.response_range.kvs])
            elif isinstance(op, Delete):
                results.append(int(r.response_delete_range.deleted))
            else:
                results.append(None)
        return TxnResult(bool(resp.succeeded), results, int(resp.header.revision))

    def _compare(self, c: Compare, pb: Any) -> None:
        """Fill `pb`, a new rpc.Compare, from `c`."""
        if not isinstance(c, Compare):
            raise EtcdRequestError(f"txn compares must be Compare, not {type(c).__name__}")
        target = c.target.value
        pb.key = self.keys.encode(c.key)
        pb.result = _OPS[c.op]
        pb.target = target
        setattr(pb, _TARGET_FIELD[target], c.operand)

    def _op(self, op: Op, pb: Any) -> None:
        """Fill `pb`, a new rpc.RequestOp, from `op`."""
        if isinstance(op, Put):
            put = pb.request_put
            put.key = self.keys.encode(op.key)
            put.value = check_value(op.value)
            put.lease = _lease_id(op.lease)
            return
        if isinstance(op, Delete | Get):
            if op.prefix:
                key, end = self.keys.prefix_range(op.key)
            else:
                key, end = self.keys.encode(op.key), b""
            if isinstance(op, Delete):
                ranged = pb.request_delete_range
            else:
                ranged = pb.request_range
                ranged.limit = op.limit
            ranged.key = key
            ranged.range_end = end
            return
        raise EtcdRequestError(f"txn ops must be Put, Delete or Get, not {type(op).__name__}")

    async def compact(self, revision: int) -> None:
        """Discard history before `revision` (maintenance and tests)."""
        request = rpc.CompactionRequest(revision=revision, physical=True)
        await self._call("kv", "Compact", request, idempotent=True)

    # --- leases --------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; returns its id. Keep it alive with `LeaseKeeper`."""
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
            raise EtcdRequestError(f"lease ttl must be a positive int, not {ttl!r}")
        resp = await self._call(
            "lease", "LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl), idempotent=False
        )
        return int(resp.ID)

    async def revoke(self, lease_id: int) -> None:
        """Revoke a lease, deleting its keys. A lease that is already gone is not an error."""
        request = rpc.LeaseRevokeRequest(ID=lease_id)
        with contextlib.suppress(EtcdLeaseNotFound):
            await self._call("lease", "LeaseRevoke", request, idempotent=True)

    async def time_to_live(self, lease_id: int) -> int:
        """Seconds the lease has left, or -1 when it does not exist."""
        request = rpc.LeaseTimeToLiveRequest(ID=lease_id)
        resp = await self._call("lease", "LeaseTimeToLive", request, idempotent=True)
        return int(resp.TTL)

    # --- watches -------------------------------------------------------------------------

    def watch_prefix(
        self, prefix: str, start_revision: int | None = None, deletes_only: bool = False
    ) -> AsyncIterator[WatchItem]:
        """Changes under `prefix` from `start_revision` (inclusive; None: from now on);
        `deletes_only`: only deletions (etcd filters the puts out before sending them).

        Never loses or repeats an event across endpoint failures; yields `WatchResync` when
        the revision it needs was compacted (a full listing, puts included). Runs until the
        caller stops iterating.
        """
        from lunastor.common.etcd.watch import watch_prefix

        return watch_prefix(self, prefix, start_revision, deletes_only)


def channel_closed_under_us() -> bool:
    """Whether a CancelledError came from grpc (its channel was closed), not from someone
    cancelling the current task: grpc.aio raises CancelledError for both."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def _lease_id(lease: int | None) -> int:
    if lease is None:
        return 0
    if not isinstance(lease, int) or isinstance(lease, bool) or lease < 0:
        raise EtcdRequestError(f"lease must be a lease id (int), not {lease!r}")
    return lease
