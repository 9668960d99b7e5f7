"""`EtcdReservations` over a real etcd: two access points (two stores, two `ScsiTarget`s over
one volume) share reservations, RESERVE(6), resets and their effects; a change returns only
once both enforce it; a lagging access point is expelled; a fenced one refuses commands; a
new one picks the state up; concurrent changes serialize (docs/scsi.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from lunastor.chunk.access.reservations import EtcdReservations, decode_applied, encode_applied
from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.records import Keys
from lunastor.iscsi.memdev import MemoryBlockDevice
from lunastor.iscsi.scsi.target import LogicalUnit, ScsiTarget
from lunastor.iscsi.scsi.types import Nexus, ScsiCommand, ScsiResult, Status, TmfFunction
from tests.support.etcd import EtcdServer
from tests.support.procs import async_wait_for

TARGET = "iqn.2026-11.io.lunastor:tgt-0"
NAA = 0x6001405000000000_0000000000000001
VOLUME = "vol-pr"
X = Nexus("iqn.2026-11.test:x", 1, TARGET, relative_port=1)
Y = Nexus("iqn.2026-11.test:y", 2, TARGET, relative_port=2)
WRITE10 = [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]
READ10 = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]
TUR = [0] * 6


@pytest.fixture
async def etcd(etcd_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[Etcd]:
    config = EtcdConfig(endpoints=[etcd_server.endpoint], namespace=etcd_prefix, timeout=5)
    async with await Etcd.connect(config) as client:
        yield client


@dataclass
class AccessPoint:
    """One chunk server's share of the problem: its lease, its store, its target."""

    store: EtcdReservations
    target: ScsiTarget
    lease: int
    alive: bool = True
    aborted: list[tuple[Nexus, int]] = field(default_factory=list)

    async def cmd(self, nexus: Nexus, cdb: list[int], data: bytes = b"") -> ScsiResult:
        return await self.target.execute(ScsiCommand(nexus, 0, bytes(cdb), 1, data_out=data))

    async def ready(self, nexus: Nexus) -> None:
        for _ in range(8):
            if (await self.cmd(nexus, TUR)).status == Status.GOOD:
                return
        raise AssertionError("unit attentions never cleared")


async def access_point(
    etcd: Etcd, chunk: str, port: int, *, lease_ttl: float = 1.0, barrier_timeout: float = 5.0
) -> AccessPoint:
    lease = await etcd.grant(60)
    ap: AccessPoint

    def current_lease() -> tuple[int, float]:
        # a test lease lives as long as the test says (`alive`)
        return (ap.lease, time.monotonic() + 0.2) if ap.alive else (ap.lease, 0.0)

    store = EtcdReservations(
        etcd,
        chunk,
        lease=current_lease,
        lease_ttl=lease_ttl,
        barrier_timeout=barrier_timeout,
    )
    lu = LogicalUnit(MemoryBlockDevice(1024), naa_id=NAA, serial="V", pr_key=VOLUME)
    aborted: list[tuple[Nexus, int]] = []
    target = ScsiTarget(
        TARGET,
        {0: lu},
        relative_port=port,
        reservations=store,
        abort_tasks=lambda nexus, lun: aborted.append((nexus, lun)),
    )
    ap = AccessPoint(store, target, lease, aborted=aborted)
    await store.start(timeout=10)
    assert store.ready.is_set()
    return ap


def prout(sa: int, key: int, sa_key: int, ptype: int = 0) -> tuple[list[int], bytes]:
    data = key.to_bytes(8, "big") + sa_key.to_bytes(8, "big") + bytes(8)
    return [0x5F, sa, ptype, 0, 0, 0, 0, 0, 24, 0], data


def ua(result: ScsiResult) -> tuple[int, int, int]:
    assert result.status == Status.CHECK_CONDITION, result
    return (result.sense[2] & 0x0F, result.sense[12], result.sense[13])


async def applied(etcd: Etcd) -> dict[str, int]:
    kvs, _ = await etcd.get_prefix(Keys.LIVE_RESERVATIONS_APPLIED)
    return {kv.key.rsplit("/", 1)[1]: decode_applied(kv.value) for kv in kvs}


async def state_revision(etcd: Etcd) -> int:
    kv = await etcd.get(Keys.RESERVATIONS + VOLUME)
    assert kv is not None
    return kv.mod_revision


async def test_changes_through_one_access_point_are_enforced_by_the_other_on_return(
    etcd: Etcd,
) -> None:
    ap1 = await access_point(etcd, "c1", 1)
    ap2 = await access_point(etcd, "c2", 2)
    try:
        await ap1.ready(X)
        await ap2.ready(Y)
        assert (await ap2.cmd(Y, *prout(0, 0, 0xB))).status == Status.GOOD
        assert (await ap2.cmd(Y, *prout(1, 0xB, 0, ptype=3))).status == Status.GOOD
        # GOOD came back only once both applied it: no wait here
        assert set((await applied(etcd)).values()) >= {await state_revision(etcd)}
        assert (await ap1.cmd(X, WRITE10, bytes(512))).status == Status.RESERVATION_CONFLICT
        assert (await ap1.cmd(X, READ10)).status == Status.RESERVATION_CONFLICT
        # PREEMPT AND ABORT through ap1: ap2 aborted y's tasks and queued its unit attention
        # before the command returned
        assert (await ap1.cmd(X, *prout(0, 0, 0xA))).status == Status.GOOD
        assert (await ap1.cmd(X, *prout(5, 0xA, 0xB, ptype=1))).status == Status.GOOD
        assert ap2.aborted == [(Y, 0)]
        assert ua(await ap2.cmd(Y, TUR)) == (6, 0x2A, 0x05)
        assert (await ap1.cmd(X, WRITE10, bytes(512))).status == Status.GOOD
        assert (await ap2.cmd(Y, WRITE10, bytes(512))).status == Status.RESERVATION_CONFLICT
        # PERSISTENT RESERVE IN through the other access point reads the same state
        r = await ap2.cmd(Y, [0x5E, 1, 0, 0, 0, 0, 0, 0, 24, 0])
        assert r.data_in[8:16] == (0xA).to_bytes(8, "big") and r.data_in[21] == 1
        assert (await ap1.cmd(X, *prout(3, 0xA, 0))).status == Status.GOOD  # CLEAR
        # RESERVE(6) through ap1 conflicts on ap2; a LUN reset through ap2 releases it and
        # raises BUS DEVICE RESET on ap1's nexus by the time the TMF is answered
        assert (await ap1.cmd(X, [0x16, 0, 0, 0, 0, 0])).status == Status.GOOD
        assert (await ap2.cmd(Y, [0x16, 0, 0, 0, 0, 0])).status == Status.RESERVATION_CONFLICT
        assert (await ap2.cmd(Y, READ10)).status == Status.RESERVATION_CONFLICT
        ap2.target.task_management(Y, TmfFunction.LOGICAL_UNIT_RESET, 0)
        await ap2.target.settle()
        assert ua(await ap1.cmd(X, TUR)) == (6, 0x29, 0x03)
        assert ua(await ap2.cmd(Y, TUR)) == (6, 0x29, 0x03)
        assert (await ap2.cmd(Y, [0x16, 0, 0, 0, 0, 0])).status == Status.GOOD
        # the holder's nexus ends on ap2: the reservation ends everywhere
        ap2.target.nexus_lost(Y)
        await ap2.target.settle()
        assert (await ap1.cmd(X, READ10)).status == Status.GOOD
        # MODE SELECT through ap1 (caching page, WCE=0): ap2 applies it and tells y
        await ap2.ready(Y)  # a new nexus after the loss above
        mode_select = [0x15, 0x10, 0, 0, 24, 0]
        assert (await ap1.cmd(X, mode_select, bytes(4) + b"\x08\x12" + bytes(18))).status == 0
        assert not ap2.target.luns[0].write_cache
        assert ua(await ap2.cmd(Y, TUR)) == (6, 0x2A, 0x01)
        assert (await ap1.cmd(X, TUR)).status == Status.GOOD
        assert ap1.store.revoked == [] and ap2.store.revoked == []
    finally:
        await ap1.store.stop()
        await ap2.store.stop()


async def test_an_access_point_that_never_confirms_is_expelled_before_the_change_returns(
    etcd: Etcd,
) -> None:
    ap1 = await access_point(etcd, "c1", 1, lease_ttl=1.0, barrier_timeout=0.5)
    # a registered access point whose copy never moves (its watch is stuck)
    stuck = await etcd.grant(60)
    await etcd.put(Keys.live_reservations_applied("c9"), encode_applied("c9", 0), lease=stuck)
    try:
        await ap1.ready(X)
        start = time.monotonic()
        assert (await ap1.cmd(X, *prout(0, 0, 0xA))).status == Status.GOOD
        took = time.monotonic() - start
        # waited for it, revoked its lease, then waited out its own lease deadline
        assert took >= 0.5 + 1.0, took
        assert ap1.store.revoked == [Keys.live_reservations_applied("c9")]
        assert await etcd.time_to_live(stuck) == -1
        assert set(await applied(etcd)) == {"c1"}
        # with it gone, the next change does not wait
        start = time.monotonic()
        assert (await ap1.cmd(X, *prout(0, 0xA, 0xA2))).status == Status.GOOD
        assert time.monotonic() - start < 0.5
    finally:
        await ap1.store.stop()


async def test_a_fenced_access_point_refuses_commands_and_registers_again(etcd: Etcd) -> None:
    ap1 = await access_point(etcd, "c1", 1)
    ap2 = await access_point(etcd, "c2", 2)
    try:
        await ap2.ready(Y)
        ap2.alive = False  # its lease can no longer be proven alive
        await async_wait_for(lambda: _true(ap2.store.fenced), 5, "its lease deadline to pass")
        assert ua(await ap2.cmd(Y, READ10)) == (2, 0x04, 0x0A)
        assert (await ap2.cmd(Y, [0x12, 0, 0, 0, 96, 0])).status == Status.GOOD  # INQUIRY
        ap2.alive = True
        ap2.lease = await etcd.grant(60)  # a new lease: register again before serving
        await async_wait_for(
            lambda: _true(ap2.store.ready.is_set() and not ap2.store.fenced), 10, "registered"
        )
        assert (await ap2.cmd(Y, READ10)).status == Status.GOOD
        # a change through ap1 waits for ap2 under its new lease
        await ap1.ready(X)
        assert (await ap1.cmd(X, *prout(0, 0, 0xA))).status == Status.GOOD
        assert (await ap1.cmd(X, *prout(1, 0xA, 0, ptype=3))).status == Status.GOOD
        assert (await ap2.cmd(Y, READ10)).status == Status.RESERVATION_CONFLICT
        # an access point that starts later (a restarted chunk server) loads the state
        ap3 = await access_point(etcd, "c3", 3)
        try:
            assert ap3.target.luns[0].write_cache  # nobody changed the mode in this test
            await ap3.ready(Y)
            assert (await ap3.cmd(Y, READ10)).status == Status.RESERVATION_CONFLICT
            r = await ap3.cmd(Y, [0x5E, 0, 0, 0, 0, 0, 0, 0, 24, 0])  # READ KEYS
            assert r.data_in[8:16] == (0xA).to_bytes(8, "big")
        finally:
            await ap3.store.stop()
    finally:
        await ap1.store.stop()
        await ap2.store.stop()


async def _true(value: bool) -> bool:
    return value


async def test_concurrent_changes_from_two_access_points_serialize(etcd: Etcd) -> None:
    ap1 = await access_point(etcd, "c1", 1)
    ap2 = await access_point(etcd, "c2", 2)
    per_ap = 8
    try:

        def nexus(ap: int, i: int) -> Nexus:
            return Nexus(f"iqn.2026-11.test:n{ap}-{i}", i + 1, TARGET, relative_port=ap)

        async def register(ap: AccessPoint, port: int, i: int) -> Status:
            n = nexus(port, i)
            await ap.ready(n)
            # REGISTER AND IGNORE EXISTING KEY: each one bumps PRgeneration by exactly one
            return (await ap.cmd(n, *prout(6, 0, port << 8 | i))).status

        statuses = await asyncio.gather(
            *(register(ap1, 1, i) for i in range(per_ap)),
            *(register(ap2, 2, i) for i in range(per_ap)),
        )
        assert set(statuses) == {Status.GOOD}
        r = await ap1.cmd(nexus(1, 0), [0x5E, 0, 0, 0, 0, 0, 0, 1, 0, 0])  # READ KEYS
        generation = int.from_bytes(r.data_in[0:4], "big")
        keys = {
            int.from_bytes(r.data_in[i : i + 8], "big")
            for i in range(8, 8 + int.from_bytes(r.data_in[4:8], "big"), 8)
        }
        assert generation == 2 * per_ap  # no change was lost
        assert keys == {p << 8 | i for p in (1, 2) for i in range(per_ap)}
        assert ap1.store.conflicts + ap2.store.conflicts > 0  # they did collide, and retried
    finally:
        await ap1.store.stop()
        await ap2.store.stop()
