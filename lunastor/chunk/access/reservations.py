"""SCSI reservation state of every volume in etcd, enforced by every access point (issue #6).

`EtcdReservations` is the `ReservationStore` of a chunk server (docs/scsi.md, "Reservations
across access points"). The state of a volume (persistent reservations, registrations, the
SPC-2 RESERVE holder and the effects of the last change: unit attentions, aborts, resets) is
one JSON key, `Keys.RESERVATIONS + <volume id>`, changed only by transactions comparing its
`mod_revision`. Every access point keeps a copy of the whole prefix, current through a watch,
and checks every command against that copy (no etcd round trip per READ/WRITE).

The barrier: each access point writes the revision its copy has applied to
`Keys.LIVE_RESERVATIONS_APPLIED + <chunk id>`, bound to its chunk lease. A change committed at
revision R returns (and so the PERSISTENT RESERVE OUT returns GOOD) only once every key there
says >= R or has gone with its lease. An access point that cannot confirm within
`barrier_timeout` has its lease revoked, and the change returns `lease_ttl` later: by then
that server's own lease deadline has passed and it refuses every command (below).

Fencing: `current()` raises NOT READY / LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE
TRANSITION (an initiator retries, or takes another path) unless this server's applied-revision
key is written under the lease it holds now and that lease is surely alive (before its
keep-alive deadline; the hot path compares one clock reading with that deadline, cached: the
lease it registered under lives at least that long, or was revoked by a barrier that waits a
TTL, or expires in etcd no earlier, taking the key with it). Registration
happens before the copy is loaded, so a change committed before it is in the copy and one
committed after it waits for this server's acknowledgement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from prometheus_client import Counter

from lunastor.common.etcd import (
    Compare,
    Etcd,
    EtcdError,
    EventType,
    KeyValue,
    Put,
    WatchItem,
    WatchResync,
)
from lunastor.common.records import Keys
from lunastor.iscsi.scsi.pr import EMPTY, PrState
from lunastor.iscsi.scsi.reservations import ReservationListener
from lunastor.iscsi.scsi.sense import (
    INTERNAL_TARGET_FAILURE,
    LU_NOT_ACCESSIBLE_TRANSITION,
    CheckCondition,
)

log = logging.getLogger(__name__)

CHANGES = Counter("lunastor_reservation_changes_total", "SCSI reservation changes committed here")
CONFLICTS = Counter(
    "lunastor_reservation_conflicts_total",
    "reservation transactions that lost to another change (and were retried)",
)
EXPULSIONS = Counter(
    "lunastor_reservation_expulsions_total",
    "access points whose lease a reservation barrier revoked (they did not confirm in time)",
)

_LEASE_POLL = 0.1  # how often a changed or lost chunk lease is noticed (the fence is immediate)


class ReservationRecordError(ValueError):
    """A reservation key in etcd could not be decoded."""


def encode_state(state: PrState) -> bytes:
    return json.dumps(state.to_dict(), separators=(",", ":")).encode()


def decode_state(raw: bytes) -> PrState:
    try:
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("v") != 1:
            raise ValueError(f"unsupported version {d.get('v') if isinstance(d, dict) else d!r}")
        return PrState.from_dict(d)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ReservationRecordError(f"bad reservation record: {exc}") from None


def encode_applied(chunk_id: str, revision: int) -> bytes:
    return json.dumps({"v": 1, "chunk": chunk_id, "revision": revision}).encode()


def decode_applied(raw: bytes) -> int:
    """The revision an applied-revision key acknowledges (0 if unreadable: not yet)."""
    try:
        d = json.loads(raw)
        return int(d["revision"]) if isinstance(d, dict) else 0
    except (ValueError, TypeError, KeyError):
        return 0


class EtcdReservations:
    """A `ReservationStore` over etcd. Keys passed in are volume ids."""

    def __init__(
        self,
        etcd: Etcd,
        chunk_id: str,
        *,
        lease: Callable[[], tuple[int, float]],
        lease_ttl: float,
        barrier_timeout: float | None = None,
    ) -> None:
        """`lease()` is the chunk server's current lease: (id, the `time.monotonic()` until
        which it is surely alive), (0, 0.0) while it has none."""
        self.etcd = etcd
        self.chunk_id = chunk_id
        self._lease = lease
        self.lease_ttl = lease_ttl
        self.barrier_timeout = barrier_timeout if barrier_timeout is not None else 3 * lease_ttl
        self.applied_key = Keys.live_reservations_applied(chunk_id)
        self._states: dict[str, PrState] = {}
        self._listeners: list[ReservationListener] = []
        self._registered = 0  # the lease our applied-revision key lives under; 0: fenced
        # Until when our copy is known to be enforceable: the registered lease's own deadline
        # (it is surely alive until then, and a barrier that revokes it waits a TTL), so the
        # hot path compares one clock reading and asks the lease again only once it passes.
        self._until = 0.0
        self._applied = 0  # revision of the prefix our copy reflects
        self._acked = 0
        self._ack_wanted = asyncio.Event()
        self.ready = asyncio.Event()  # set while registered (tests and start-up wait on it)
        self._task: asyncio.Task[None] | None = None
        self.revoked: list[str] = []  # applied-revision keys whose lease a barrier revoked
        self.conflicts = 0  # compare-and-swaps lost to another change (then retried)

    # -- life ----------------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Follow etcd; return once registered (or after `timeout`, fenced until then)."""
        self._task = asyncio.create_task(self._run(), name="reservations")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ready.wait(), timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._registered, self._until = 0, 0.0
        self.ready.clear()

    @property
    def applied(self) -> int:
        return self._applied

    @property
    def fenced(self) -> bool:
        try:
            self._check()
        except CheckCondition:
            return True
        return False

    def _check(self) -> None:
        """Raise unless registered under the lease we hold and that lease is surely alive."""
        if time.monotonic() < self._until:
            return
        if self._registered == 0:
            raise CheckCondition(LU_NOT_ACCESSIBLE_TRANSITION)
        lease, deadline = self._lease()
        if lease != self._registered or time.monotonic() >= deadline:
            self._until = 0.0
            raise CheckCondition(LU_NOT_ACCESSIBLE_TRANSITION)
        self._until = deadline

    # -- ReservationStore ------------------------------------------------------------------

    @property
    def persistent(self) -> bool:
        return True

    def current(self, key: str) -> PrState:
        if time.monotonic() >= self._until:
            self._check()
        return self._states.get(key, EMPTY)

    async def load(self, key: str) -> tuple[int, PrState]:
        self._check()
        try:
            kv = await self.etcd.get(Keys.RESERVATIONS + key)
        except EtcdError as exc:
            log.error("reading reservations of %s: %s", key, exc)
            raise CheckCondition(LU_NOT_ACCESSIBLE_TRANSITION) from None
        if kv is None:
            return 0, EMPTY
        try:
            return kv.mod_revision, decode_state(kv.value)
        except ReservationRecordError as exc:
            log.error("%s: %s", kv.key, exc)
            raise CheckCondition(INTERNAL_TARGET_FAILURE) from None

    async def compare_and_swap(self, key: str, version: int, state: PrState) -> bool:
        self._check()
        etcd_key = Keys.RESERVATIONS + key
        try:
            result = await self.etcd.txn(
                [Compare.mod_revision(etcd_key) == version], [Put(etcd_key, encode_state(state))]
            )
        except EtcdError as exc:
            # the outcome is unknown: the initiator gets an error and asks again
            log.error("changing reservations of %s: %s", key, exc)
            raise CheckCondition(LU_NOT_ACCESSIBLE_TRANSITION) from None
        if not result.succeeded:
            self.conflicts += 1
            CONFLICTS.inc()
            return False
        CHANGES.inc()
        await self.barrier(result.revision)
        return True

    def subscribe(self, callback: ReservationListener) -> None:
        self._listeners.append(callback)

    def unsubscribe(self, callback: ReservationListener) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    # -- the barrier ---------------------------------------------------------------------

    async def barrier(self, revision: int) -> None:
        """Return once every live access point enforces revision `revision` (or has been
        expelled: its lease revoked and its own deadline passed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.barrier_timeout
        acks: dict[str, KeyValue] | None = None
        try:
            async with asyncio.timeout_at(deadline):
                # read after the commit: every access point registered before it is listed
                while True:
                    try:
                        kvs, rev = await self.etcd.get_prefix(Keys.LIVE_RESERVATIONS_APPLIED)
                        break
                    except EtcdError as exc:
                        log.warning("reading reservation acknowledgements: %s", exc)
                        await asyncio.sleep(_LEASE_POLL)
                acks = {kv.key: kv for kv in kvs}
                if _confirmed(acks, revision):
                    return
                async with _watching(self.etcd, Keys.LIVE_RESERVATIONS_APPLIED, rev + 1) as items:
                    async for item in items:
                        if isinstance(item, WatchResync):
                            acks = {kv.key: kv for kv in item.kvs}
                        elif item.type is EventType.PUT:
                            if item.kv.key in acks or item.kv.create_revision <= rev:
                                acks[item.kv.key] = item.kv
                            # a key created after our read: that access point loaded its
                            # copy after the commit, it need not be waited for
                        else:
                            acks.pop(item.kv.key, None)
                        if _confirmed(acks, revision):
                            return
        except (TimeoutError, EtcdError):
            pass
        if acks is None:
            # committed, but who must enforce it is unknown: not GOOD (the initiator asks
            # again, or reads the state with PERSISTENT RESERVE IN)
            raise CheckCondition(LU_NOT_ACCESSIBLE_TRANSITION)
        laggards = [kv for kv in acks.values() if decode_applied(kv.value) < revision]
        for kv in laggards:
            log.error(
                "%s did not confirm reservation revision %d within %.1f s: revoking its lease",
                kv.key,
                revision,
                self.barrier_timeout,
            )
            self.revoked.append(kv.key)
            EXPULSIONS.inc()
            with contextlib.suppress(EtcdError):
                await self.etcd.revoke(kv.lease)
        if laggards:
            # its keep-alives fail from now on: within one TTL it can no longer prove its
            # lease alive, and then it refuses every command (`fenced`)
            await asyncio.sleep(self.lease_ttl)

    # -- following etcd ------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._follow_under_one_lease()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd trouble: fenced until registered again
                log.warning("reservation watch stopped (%s); registering again", exc)
            finally:
                self._registered, self._until = 0, 0.0
                self.ready.clear()
            await asyncio.sleep(_LEASE_POLL)

    async def _follow_under_one_lease(self) -> None:
        while True:
            lease, deadline = self._lease()
            if lease and time.monotonic() < deadline:
                break
            await asyncio.sleep(_LEASE_POLL)
        # Register first, then load: whatever was committed before the registration is in
        # the copy, and a change committed after it waits for our acknowledgement.
        await self.etcd.put(self.applied_key, encode_applied(self.chunk_id, 0), lease=lease)
        kvs, rev = await self.etcd.get_prefix(Keys.RESERVATIONS)
        self._states = {}
        for kv in kvs:
            self._put(kv, notify=False)
        self._applied, self._acked = rev, 0
        self._registered = lease
        self.ready.set()
        self._ack_wanted.set()
        watch = asyncio.create_task(self._watch(rev + 1), name="reservations watch")
        ack = asyncio.create_task(self._ack(lease), name="reservations ack")
        lease_gone = asyncio.create_task(self._lease_changes(lease), name="reservations lease")
        tasks = {watch, ack, lease_gone}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raise what stopped it
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _lease_changes(self, lease: int) -> None:
        while self._lease()[0] == lease:
            await asyncio.sleep(_LEASE_POLL)
        log.warning("chunk lease changed: registering for reservations again")

    async def _watch(self, start: int) -> None:
        async with _watching(self.etcd, Keys.RESERVATIONS, start) as items:
            async for item in items:
                if isinstance(item, WatchResync):
                    # compacted past us: take the whole state, without replaying effects
                    self._states = {}
                    for kv in item.kvs:
                        self._put(kv, notify=False)
                elif item.type is EventType.PUT:
                    self._put(item.kv, notify=True)
                else:
                    self._states.pop(item.kv.key.removeprefix(Keys.RESERVATIONS), None)
                self._applied = item.revision
                self._ack_wanted.set()

    def _put(self, kv: KeyValue, *, notify: bool) -> None:
        key = kv.key.removeprefix(Keys.RESERVATIONS)
        try:
            state = decode_state(kv.value)
        except ReservationRecordError as exc:
            log.error("%s: %s (keeping the previous state)", kv.key, exc)
            return
        self._states[key] = state
        # a state read in bulk (start, re-registration, compaction) reaches the listeners
        # without its effects, which belonged to a change they may have seen long ago; they
        # still take its lasting parts (mode parameters)
        report = state if notify else state.quiet()
        for callback in list(self._listeners):
            try:
                callback(key, report)
            except Exception:
                log.exception("reservation listener failed")

    async def _ack(self, lease: int) -> None:
        """Publish the applied revision (coalesced: the latest one when etcd answers)."""
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            revision = self._applied
            if revision <= self._acked:
                continue
            await self.etcd.put(
                self.applied_key, encode_applied(self.chunk_id, revision), lease=lease
            )
            self._acked = revision


@contextlib.asynccontextmanager
async def _watching(etcd: Etcd, prefix: str, start: int) -> AsyncIterator[AsyncIterator[WatchItem]]:
    """A watch whose gRPC stream is closed when the block ends (not when collected)."""
    items = etcd.watch_prefix(prefix, start)
    try:
        yield items
    finally:
        close = getattr(items, "aclose", None)
        if close is not None:
            await close()


def _confirmed(acks: dict[str, KeyValue], revision: int) -> bool:
    return all(decode_applied(kv.value) >= revision for kv in acks.values())
