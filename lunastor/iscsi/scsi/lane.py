"""The SCSI side of the command fast path: `FastLane`, one per (I_T nexus, logical unit).

The iSCSI session layer runs a plain READ/WRITE(10)/(16) inline, without building a
`ScsiCommand` or a coroutine, when `FastLane.admit` says the full path (`ScsiTarget.execute`
and the sbc handlers) would do nothing but the I/O: the LU exists for the nexus, no unit
attention is pending, the capacity has not changed since the nexus last looked, no
reservation conflicts, the LU is started (and, for a write, writable with its write cache on
and no FUA), and the transfer is inside the LU and its transfer limit. Anything else returns
0 and the command takes the full path, which produces the sense data, the unit attention or
the reservation conflict exactly as before.

`plain` is the per-(session, LUN) flag: the target clears it on every unit attention it
raises for the LU's nexuses, reservation or mode change, reset, task management function,
lost nexus, capacity change and LUN map / ACL change; the session layer then asks the target
for a fresh lane (`ScsiTarget.fast_lane`). The checks in `admit` that are cheap and live
(pending unit attentions, capacity generation, started, write protection, the reservation
store's current view, which an etcd-backed store may refuse once its lease runs out) are
made on every command as well, so that no path that forgets to clear the flag can make the
fast path answer differently from the full one.

The device side is the inline I/O contract (`blockdev.InlineBlockDevice`): devices that can
answer synchronously from the event loop thread (a local file, memory) offer `read_inline`
and `write_inline`, and `inline_ok` which they (or a QoS limiter wrapping them) turn off to
send every command through the full, awaitable path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lunastor.iscsi.blockdev import InlineBlockDevice
from lunastor.iscsi.scsi.pr import conflicts
from lunastor.iscsi.scsi.sense import CheckCondition

if TYPE_CHECKING:
    from lunastor.iscsi.scsi.reservations import ReservationStore
    from lunastor.iscsi.scsi.target import LogicalUnit, NexusState


class FastLane:
    """What the fast path needs to run one nexus's plain I/O on one LU inline."""

    __slots__ = (
        "block_size",
        "device",
        "inline",
        "inline_writes",
        "key",
        "lu",
        "ns",
        "plain",
        "store",
    )

    def __init__(self, lu: LogicalUnit, ns: NexusState, store: ReservationStore) -> None:
        self.plain = True
        self.lu = lu
        self.ns = ns
        dev = lu.device
        self.device = dev
        self.block_size = dev.block_size
        self.store = store
        self.key = lu.pr_key
        self.inline: InlineBlockDevice | None = dev if isinstance(dev, InlineBlockDevice) else None
        # a device that can read inline but never write inline (a replicated volume: a write
        # awaits its primary) says so, and its writes skip the attempt
        self.inline_writes = getattr(dev, "inline_writes", True)

    def admit(self, lba: int, blocks: int, write: bool) -> int:
        """Bytes a READ (write=False) or WRITE without FUA of `blocks` at `lba` moves, when
        the full path would run it as plain I/O and the device can do it inline; else 0."""
        lu = self.lu
        if lu.device is not self.device:
            # the LU's device was swapped (a QoS limiter put in front of it, or taken away):
            # this lane would bypass the new one. The session asks for a fresh lane.
            self.plain = False
            return 0
        dev = self.inline
        if dev is None or not self.plain or not dev.inline_ok:
            return 0
        ns = self.ns
        if (
            ns.unit_attentions
            or not lu.started
            or dev.capacity_generation != ns.capacity_generation
            or not 0 < blocks <= lu.max_transfer_blocks
            or lba + blocks > dev.num_blocks
        ):
            return 0
        if write and (
            not self.inline_writes
            or not lu.write_cache
            or lu.software_write_protect
            or dev.read_only
        ):
            return 0
        try:
            state = self.store.current(self.key)
        except CheckCondition:
            return 0
        holder = state.spc2_holder
        if holder is not None:
            if holder != ns.itid:
                return 0
        elif state.type is not None and conflicts(state, ns.itid, write):
            return 0
        return blocks * self.block_size
