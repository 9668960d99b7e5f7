"""The reservation store contract, and PERSISTENT RESERVE OUT over a contended store."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lunastor.iscsi.scsi.pr import EMPTY, PrState, PrType, Registration
from lunastor.iscsi.scsi.reservations import InProcessReservations, ReservationStore
from lunastor.iscsi.scsi.target import ScsiTarget
from lunastor.iscsi.scsi.types import Status
from tests.unit.scsi.harness import TARGET, A, B, Rig

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
