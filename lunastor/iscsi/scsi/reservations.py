"""Where reservation state lives: `ReservationStore`, and its in-process implementation.

The store knows nothing of SCSI: it holds one versioned `PrState` per logical unit (keyed by
a string that is stable for the volume, e.g. its NAA identifier) and swaps it atomically.
`current()` is the cached view every command is checked against; `load`/`compare_and_swap`
are what PERSISTENT RESERVE OUT retries over. An etcd-backed store implements the same
protocol with one key per LU, a watch keeping `current()` fresh and `mod_revision` as version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from lunastor.iscsi.scsi.pr import EMPTY, PrState


@runtime_checkable
class ReservationStore(Protocol):
    @property
    def persistent(self) -> bool: ...  # survives a restart: APTPL may be accepted

    def current(self, key: str) -> PrState: ...  # never blocks; the latest state known here

    async def load(self, key: str) -> tuple[int, PrState]: ...  # (version, state)

    async def compare_and_swap(self, key: str, version: int, state: PrState) -> bool: ...

    # Every committed change is reported to every subscriber (each access point's targets),
    # including the one that made it: that is how unit attentions and PREEMPT AND ABORT reach
    # nexuses connected elsewhere. The in-process store calls back before the swap returns.
    def subscribe(self, callback: ReservationListener) -> None: ...

    def unsubscribe(self, callback: ReservationListener) -> None: ...


ReservationListener = Callable[[str, PrState], None]

CAS_ATTEMPTS = 32


class ReservationsBusy(Exception):
    """Every compare-and-swap lost to another access point's change (`CAS_ATTEMPTS` times)."""


async def update(
    store: ReservationStore, key: str, change: Callable[[PrState], PrState]
) -> PrState:
    """Apply `change` to the latest state of `key` and swap it in, retrying when another
    access point changed it in between. `change` gets the state without the previous
    transition's effects and returns it unchanged (the very object) to change nothing."""
    for _ in range(CAS_ATTEMPTS):
        version, state = await store.load(key)
        state = state.quiet()
        new = change(state)
        if new is state:
            return state
        if await store.compare_and_swap(key, version, new):
            return new
    raise ReservationsBusy(key)


class InProcessReservations:
    """Reservation state in this process's memory (one access point, or tests)."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[int, PrState]] = {}
        self._listeners: list[ReservationListener] = []

    @property
    def persistent(self) -> bool:
        return False

    def current(self, key: str) -> PrState:
        entry = self._states.get(key)
        return EMPTY if entry is None else entry[1]

    async def load(self, key: str) -> tuple[int, PrState]:
        return self._states.get(key, (0, EMPTY))

    async def compare_and_swap(self, key: str, version: int, state: PrState) -> bool:
        current = self._states.get(key, (0, EMPTY))[0]
        if current != version:
            return False
        self._states[key] = (version + 1, state)
        for callback in list(self._listeners):
            callback(key, state)
        return True

    def subscribe(self, callback: ReservationListener) -> None:
        self._listeners.append(callback)

    def unsubscribe(self, callback: ReservationListener) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)
