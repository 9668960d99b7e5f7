"""The reservation store contract, and PERSISTENT RESERVE OUT over a contended store."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lunastor.iscsi.memdev import MemoryBlockDevice
from lunastor.iscsi.scsi.pr import EMPTY, PrState, PrType, Registration
from lunastor.iscsi.scsi.reservations import InProcessReservations, ReservationStore
from lunastor.iscsi.scsi.target import LogicalUnit, ScsiTarget
from lunastor.iscsi.scsi.types import Nexus, ScsiCommand, Status, TmfFunction
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
    st.none() | nexuses,
    st.lists(
        st.tuples(st.integers(0, 0xFFFF), st.integers(0, 255), st.integers(0, 255)), max_size=2
    ).map(tuple),
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


# -- LU state shared by two access points: a table of steps -----------------------------------
# (access point, nexus, what, expected): what is a CDB (status expected), "lun reset" (then
# settle), "lost" (nexus_lost) or "ua" (the TUR that must end with that ASC/ASCQ).
RESERVE6, RELEASE6 = [0x16, 0, 0, 0, 0, 0], [0x17, 0, 0, 0, 0, 0]
READ10 = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]
TUR = [0, 0, 0, 0, 0, 0]
REGISTER_X = [0x5F, 0, 0, 0, 0, 0, 0, 0, 24, 0]
MODE_SELECT_WCE_OFF = [0x15, 0x10, 0, 0, 24, 0]  # caching page, WCE=0
MODE_SENSE_CACHING = [0x1A, 0x08, 0x08, 0, 255, 0]
C = Status.RESERVATION_CONFLICT
G = Status.GOOD
SHARED_CASES: dict[str, list[tuple[int, str, object, object]]] = {
    "RESERVE(6) through one access point conflicts on the other": [
        (1, "x", RESERVE6, G),
        (2, "y", RESERVE6, C),
        (2, "y", READ10, C),
        (2, "y", RELEASE6, G),  # someone else's: a no-op
        (2, "y", READ10, C),
        (1, "x", RELEASE6, G),
        (2, "y", RESERVE6, G),
        (1, "x", READ10, C),
    ],
    "a LUN reset on one access point releases RESERVE(6) and reaches every nexus": [
        (1, "x", RESERVE6, G),
        (2, "y", "lun reset", None),
        (1, "x", "ua", (0x29, 0x03)),
        (2, "y", "ua", (0x29, 0x03)),
        (2, "y", RESERVE6, G),
        (1, "x", RESERVE6, C),
    ],
    "the holder's lost nexus ends RESERVE(6) everywhere": [
        (2, "y", RESERVE6, G),
        (1, "x", READ10, C),
        (2, "y", "lost", None),
        (1, "x", READ10, G),
    ],
    "MODE SELECT through one access point changes the mode for every nexus": [
        (1, "x", MODE_SELECT_WCE_OFF, G),
        (2, "y", "ua", (0x2A, 0x01)),
        (2, "y", MODE_SENSE_CACHING, "wce off"),
        (1, "x", TUR, G),  # not for the nexus that changed it
    ],
    "a registration through either access point makes RESERVE(6) conflict (CRH=0)": [
        (2, "y", REGISTER_X, G),
        (1, "x", RESERVE6, C),
        (1, "x", RELEASE6, C),
    ],
}


@pytest.mark.parametrize("steps", list(SHARED_CASES.values()), ids=list(SHARED_CASES))
async def test_lu_state_shared_by_two_access_points(
    steps: list[tuple[int, str, object, object]],
) -> None:
    store = InProcessReservations()
    device = MemoryBlockDevice(1024)
    aps = {
        port: ScsiTarget(
            TARGET,
            {0: LogicalUnit(device, naa_id=NAA, serial="V")},
            relative_port=port,
            reservations=store,
        )
        for port in (1, 2)
    }
    nexuses = {
        "x": Nexus("iqn.2026-01.io.test:x", 1, TARGET, relative_port=1),
        "y": Nexus("iqn.2026-01.io.test:y", 2, TARGET, relative_port=2),
    }
    for port, name in ((1, "x"), (2, "y")):
        for _ in range(2):  # POWER ON
            await aps[port].execute(ScsiCommand(nexuses[name], 0, bytes(TUR), 1))
    for i, (port, name, what, expected) in enumerate(steps):
        ap, nexus = aps[port], nexuses[name]
        if what == "lun reset":
            ap.task_management(nexus, TmfFunction.LOGICAL_UNIT_RESET, 0)
            await ap.settle()
            continue
        if what == "lost":
            ap.nexus_lost(nexus)
            await ap.settle()
            continue
        cdb = TUR if what == "ua" else what
        data = b""
        if cdb is REGISTER_X:
            data = bytes(8) + (0xAB).to_bytes(8, "big") + bytes(8)
        elif cdb is MODE_SELECT_WCE_OFF:
            data = bytes(4) + bytes([0x08, 0x12]) + bytes(18)
        r = await ap.execute(ScsiCommand(nexus, 0, bytes(cdb), 1, data_out=data))  # type: ignore[arg-type]
        if what == "ua":
            assert r.status == Status.CHECK_CONDITION, (i, r)
            assert (r.sense[2], r.sense[12], r.sense[13]) == (6, *expected), i  # type: ignore[misc]
        elif expected == "wce off":
            assert r.status == G and r.data_in[4:6] == b"\x08\x12", (i, r)
            assert not r.data_in[6] & 0x04, i
        else:
            assert r.status == expected, (i, r.status)
