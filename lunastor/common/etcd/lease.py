"""`LeaseKeeper`: keeps one etcd lease alive from its own thread.

The keeper must not depend on the daemon's event loop: a data path busy for a few seconds
would otherwise starve the heartbeat and lose the lease. It therefore uses a *blocking* gRPC
channel in a plain thread, not an asyncio loop: grpc.aio dispatches completions through a
process-wide poller bound to the loops that use it, so an asyncio client in a second thread
would still share machinery with the IO loop (and logs errors when a loop closes first).

Keep-alives go out every ttl/3. `deadline()` is conservative: the send time of the last
keep-alive that etcd answered plus the TTL it returned. etcd extends the lease when it
*receives* that request, so the lease surely lives until then.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from aetcd import rpc

from lunastor.common.etcd.client import open_channel
from lunastor.common.etcd.config import EtcdConfig
from lunastor.common.etcd.errors import (
    EtcdError,
    EtcdLeaseNotFound,
    EtcdRequestError,
    EtcdTokenExpired,
    EtcdUnavailable,
    error_from_status,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# After a failed keep-alive, try again this soon (bounded by ttl/3) so a failover to another
# endpoint happens well within the TTL.
_RETRY_INTERVAL = 0.25


class _BlockingLeaseClient:
    """Lease RPCs over a blocking channel, one endpoint at a time, failing over on errors."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self._index = 0
        self._channel: Any = None
        self._stub: Any = None
        self._metadata: tuple[tuple[str, str], ...] = ()

    @property
    def endpoint(self) -> str:
        return self.config.endpoints[self._index]

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None

    def _connect(self, timeout: float) -> Any:
        if self._stub is None:
            self._channel = open_channel(self.config, self.endpoint, aio=False)
            self._stub = rpc.LeaseStub(self._channel)
            self._metadata = ()
            if self.config.user is not None:
                request = rpc.AuthenticateRequest(
                    name=self.config.user, password=self.config.password
                )
                resp = rpc.AuthStub(self._channel).Authenticate(request, timeout=timeout)
                self._metadata = (("token", resp.token),)
        return self._stub

    def call(self, fn: Callable[[Any, tuple[tuple[str, str], ...], float], T], timeout: float) -> T:
        """`fn(stub, metadata, timeout)` once; on an unreachable endpoint, move to the next."""
        try:
            return fn(self._connect(timeout), self._metadata, timeout)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            err = error_from_status(code, details, self.endpoint)
            if isinstance(err, EtcdUnavailable | EtcdTokenExpired):
                self.close()  # reconnect (and re-authenticate) on the next call
            if isinstance(err, EtcdUnavailable):
                self._index = (self._index + 1) % len(self.config.endpoints)
            raise err from exc

    def grant(self, ttl: int) -> tuple[int, int]:
        resp = self.call(
            lambda s, md, t: s.LeaseGrant(rpc.LeaseGrantRequest(TTL=ttl), timeout=t, metadata=md),
            self.config.timeout,
        )
        return int(resp.ID), int(resp.TTL)

    def keepalive(self, lease_id: int, timeout: float) -> int:
        """One keep-alive; returns the TTL etcd granted, <= 0 when the lease is gone."""

        def send(stub: Any, md: tuple[tuple[str, str], ...], t: float) -> int:
            responses = stub.LeaseKeepAlive(
                iter([rpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout=t, metadata=md
            )
            for resp in responses:
                return int(resp.TTL)
            raise EtcdUnavailable(f"etcd {self.endpoint}: keep-alive stream ended")

        return self.call(send, timeout)

    def revoke(self, lease_id: int) -> None:
        with contextlib.suppress(EtcdLeaseNotFound):
            self.call(
                lambda s, md, t: s.LeaseRevoke(
                    rpc.LeaseRevokeRequest(ID=lease_id), timeout=t, metadata=md
                ),
                self.config.timeout,
            )


class LeaseKeeper:
    """Grants a lease of `ttl` seconds and keeps it alive until `stop()` or until it is lost.

    `lost` is set (and `on_lost` called on the event loop that ran `start()`) when etcd says
    the lease is gone, or when `deadline()` passes without a successful keep-alive.
    """

    def __init__(
        self, config: EtcdConfig, ttl: int, on_lost: Callable[[], object] | None = None
    ) -> None:
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
            raise EtcdRequestError(f"lease ttl must be a positive int, not {ttl!r}")
        self.config = config
        self.ttl = ttl
        self.on_lost = on_lost
        #: Set once the lease is lost; never cleared (take a new lease instead).
        self.lost = threading.Event()
        #: Why the lease was lost.
        self.lost_reason = ""
        self._lease_id = 0
        self._deadline = 0.0
        self._stopping = threading.Event()
        self._revoke_on_stop = True
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> LeaseKeeper:
        """Grant the lease (raising `EtcdError` if that fails) and start keeping it alive."""
        if self._thread is not None:
            raise EtcdRequestError("LeaseKeeper already started")
        self._loop = asyncio.get_running_loop()
        granted: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(granted,), name="etcd-lease-keeper", daemon=True
        )
        self._thread.start()
        try:
            await asyncio.wrap_future(granted)
        except BaseException:
            # Failed or cancelled: a lease granted meanwhile must not be kept alive forever.
            self._stopping.set()
            raise
        return self

    async def stop(self, revoke: bool = True) -> None:
        """Stop the keep-alives and, with `revoke`, revoke the lease (deleting its keys)."""
        self._revoke_on_stop = revoke
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def __aenter__(self) -> LeaseKeeper:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def lease_id(self) -> int:
        if not self._lease_id:
            raise EtcdRequestError("LeaseKeeper not started")
        return self._lease_id

    def deadline(self) -> float:
        """`time.monotonic()` value until which the lease is surely alive (0 once known gone)."""
        return self._deadline

    def alive(self) -> bool:
        """True while the lease is surely alive."""
        return not self.lost.is_set() and time.monotonic() < self._deadline

    # --- the keeper thread ---------------------------------------------------------------

    def _run(self, granted: concurrent.futures.Future[None]) -> None:
        client = _BlockingLeaseClient(self.config)
        try:
            try:
                self._grant(client, granted)
            except BaseException as exc:  # never leave start() waiting forever
                _settle(granted, exc)
                raise
            if self._lease_id:
                self._keep_alive(client)
        finally:
            if self._lease_id and self._revoke_on_stop and self._stopping.is_set():
                try:
                    client.revoke(self._lease_id)
                except EtcdError as exc:
                    log.warning("could not revoke lease %x: %s", self._lease_id, exc)
            client.close()

    def _grant(
        self, client: _BlockingLeaseClient, granted: concurrent.futures.Future[None]
    ) -> None:
        last: EtcdError | None = None
        for _ in self.config.endpoints:  # each failure moves the client to the next endpoint
            sent = time.monotonic()
            try:
                lease_id, ttl = client.grant(self.ttl)
            except EtcdUnavailable as exc:
                last = exc
                continue
            except EtcdError as exc:
                last = exc
                break
            self._deadline = sent + ttl
            self._lease_id = lease_id
            _settle(granted, None)
            return
        assert last is not None
        _settle(granted, last)

    def _keep_alive(self, client: _BlockingLeaseClient) -> None:
        interval = self.ttl / 3
        next_send = time.monotonic() + interval
        while True:
            now = time.monotonic()
            if now >= self._deadline:
                self._lose(f"no successful keep-alive before the deadline ({client.endpoint})")
                return
            if self._stopping.wait(max(0.0, min(next_send, self._deadline) - now)):
                return
            sent = time.monotonic()
            if sent >= self._deadline:
                continue  # reported at the top of the loop
            if sent < next_send:
                continue
            try:
                # Never block past the deadline: losing must be noticed on time.
                timeout = max(0.01, min(self.config.timeout, self._deadline - sent))
                ttl = client.keepalive(self._lease_id, timeout)
            except EtcdError as exc:
                log.warning("lease %x keep-alive failed: %s", self._lease_id, exc)
                next_send = time.monotonic() + min(interval, _RETRY_INTERVAL)
                continue
            if ttl <= 0:
                self._deadline = 0.0
                self._lose("etcd says the lease no longer exists")
                return
            self._deadline = sent + ttl
            next_send = sent + interval

    def _lose(self, reason: str) -> None:
        log.error("lease %x lost: %s", self._lease_id, reason)
        self.lost_reason = reason
        self.lost.set()
        if self.on_lost is not None and self._loop is not None:
            # RuntimeError: the owner's loop is closed; nobody is left to tell.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.on_lost)


def _settle(future: concurrent.futures.Future[None], exc: BaseException | None) -> None:
    """Resolve `start()`'s future, unless it was cancelled (start() itself was cancelled)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)
