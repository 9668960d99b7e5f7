"""The reservation store contract, and PERSISTENT RESERVE OUT over a contended store."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lunastor.iscsi.memdev import MemoryBlockDevice
from lunastor.iscsi.scsi.pr import EMPTY, PrState, PrType, Registration
from lunastor.iscsi.scsi.reservations import InProcessReservations, ReservationStore
from lunastor.iscsi.scsi.target import LogicalUnit, ScsiTarget
from lunastor.iscsi.scsi.types import Nexus, ScsiCommand, Status
from tests.unit.scsi.harness import NAA, TARGET, A, B, Rig

nexuses = st.tuples(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
states = st.builds(
    PrState,
    st.integers(0, 2**32 - 1),
    st.dictionaries(
        nexuses,
        st.builds(Registration, st.integers(1, 2**64 - 1), st.integers(0, 0xFFFF), st.booleans()),
        max_size=4,
    ),
    st.none() | nexuses,
    st.none() | st.sampled_from(list(PrType)),
    st.booleans(),
    st.lists(st.tuples(nexuses, st.integers(0, 255), st.integers(0, 255)), max_size=3).map(tuple),
    st.lists(nexuses, max_size=3).map(tuple),
)


@given(states)
def test_state_round_trips_through_its_plain_form(state: PrState) -> None:
    assert PrState.from_dict(state.to_dict()) == state


async def test_in_process_store_compare_and_swap() -> None:
    store = InProcessReservations()
    assert isinstance(store, ReservationStore)
    version, state = await store.load("lu")
    assert state is EMPTY and store.current("lu") is EMPTY
    new = PrState(generation=1)
    assert await store.compare_and_swap("lu", version, new)
    assert not await store.compare_and_swap("lu", version, PrState(generation=2))
    assert store.current("lu") == new
    assert (await store.load("lu"))[1] == new


class RacingStore(InProcessReservations):
    """Another access point registers B between our load and our swap, once."""

    def __init__(self) -> None:
        super().__init__()
        self.raced = False

    async def compare_and_swap(self, key: str, version: int, state: PrState) -> bool:
        if not self.raced:
            self.raced = True
            _, current = await self.load(key)
            regs = dict(current.registrations)
            regs[(B.initiator_port, B.target_port)] = Registration(0xB, 2)
            await super().compare_and_swap(key, version, PrState(current.generation + 1, regs))
        return await super().compare_and_swap(key, version, state)


async def test_persistent_reserve_out_retries_a_lost_swap() -> None:
    rig = Rig()
    store = RacingStore()
    rig.target = ScsiTarget(TARGET, {0: rig.lu}, reservations=store)
    await rig.ready(A)
    data = bytes(8) + (0xA).to_bytes(8, "big") + bytes(8)
    r = await rig.cmd([0x5F, 0, 0, 0, 0, 0, 0, 0, 24, 0], data)
    assert r.status == Status.GOOD and store.raced
    keys = {reg.key for reg in store.current(rig.lu.pr_key).registrations.values()}
    assert keys == {0xA, 0xB}
    assert store.current(rig.lu.pr_key).generation == 2


async def test_two_access_points_share_reservations_and_their_effects() -> None:
    """One volume served by two access points (relative ports 1 and 2) over one store: a
    reservation taken through one is enforced by the other, and PREEMPT AND ABORT run on one
    reaches the preempted nexus on the other with its unit attention and task abort."""
    store = InProcessReservations()
    device = MemoryBlockDevice(1024)
    aborted: list[tuple[Nexus, int]] = []
    ap1 = ScsiTarget(TARGET, {0: LogicalUnit(device, naa_id=NAA, serial="V")}, reservations=store)
    ap2 = ScsiTarget(
        TARGET,
        {0: LogicalUnit(device, naa_id=NAA, serial="V")},
        relative_port=2,
        reservations=store,
        abort_tasks=lambda nexus, lun: aborted.append((nexus, lun)),
    )
    x = Nexus("iqn.2026-01.io.test:x", 1, TARGET, relative_port=1)
    y = Nexus("iqn.2026-01.io.test:y", 2, TARGET, relative_port=2)

    async def cmd(ap: ScsiTarget, nexus: Nexus, cdb: list[int], data: bytes = b""):  # type: ignore[no-untyped-def]
        return await ap.execute(ScsiCommand(nexus, 0, bytes(cdb), 1, data_out=data))

    def prout(sa: int, key: int, sa_key: int, ptype: int = 0) -> tuple[list[int], bytes]:
        data = key.to_bytes(8, "big") + sa_key.to_bytes(8, "big") + bytes(8)
        return [0x5F, sa, ptype, 0, 0, 0, 0, 0, 24, 0], data

    write = [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]
    await cmd(ap1, x, [0] * 6)  # POWER ON
    await cmd(ap2, y, [0] * 6)
    assert (await cmd(ap2, y, *prout(0, 0, 0xB))).status == Status.GOOD
    assert (await cmd(ap2, y, *prout(1, 0xB, 0, ptype=3))).status == Status.GOOD
    assert (await cmd(ap1, x, write, bytes(512))).status == Status.RESERVATION_CONFLICT
    assert (await cmd(ap1, x, *prout(0, 0, 0xA))).status == Status.GOOD
    assert (await cmd(ap1, x, *prout(5, 0xA, 0xB, ptype=1))).status == Status.GOOD
    assert aborted == [(y, 0)]
    r = await cmd(ap2, y, [0] * 6)
    assert (r.sense[2], r.sense[12], r.sense[13]) == (6, 0x2A, 0x05)
    assert (await cmd(ap1, x, write, bytes(512))).status == Status.GOOD
    assert (await cmd(ap2, y, write, bytes(512))).status == Status.RESERVATION_CONFLICT
    # READ FULL STATUS names the access point each registration came through
    r = await cmd(ap2, y, [0x5E, 3, 0, 0, 0, 0, 0, 1, 0, 0])
    assert r.data_in[8:16] == (0xA).to_bytes(8, "big") and r.data_in[26:28] == b"\x00\x01"
    ap1.close()
    ap2.close()
