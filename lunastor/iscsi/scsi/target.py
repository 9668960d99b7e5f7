"""The entry point the iSCSI session layer calls: `ScsiTarget.execute` and friends.

One `ScsiTarget` per iSCSI target holds its logical units (`LogicalUnit`: a `BlockDevice` plus
identity and SCSI state). `execute` decodes the opcode through the command table, applies the
SPC-4 ordering (LUN existence, unit attention, reservation conflict, CDB reserved bits), runs
the handler and turns every `CheckCondition` / `BlockDeviceError` into sense data. Handlers
live in `spc.py`, `mode.py`, `sbc.py` and `prcmds.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from lunastor.iscsi.blockdev import BlockDevice, BlockDeviceError
from lunastor.iscsi.resume import Resumed
from lunastor.iscsi.scsi import commands, handlers
from lunastor.iscsi.scsi.commands import BY_OPCODE, Access
from lunastor.iscsi.scsi.lane import FastLane
from lunastor.iscsi.scsi.pr import ItNexus, PrState, ReservationConflict, conflicts
from lunastor.iscsi.scsi.reservations import InProcessReservations, ReservationStore, update
from lunastor.iscsi.scsi.sense import (
    BUS_DEVICE_RESET,
    CAPACITY_DATA_HAS_CHANGED,
    INTERNAL_TARGET_FAILURE,
    LU_NOT_SUPPORTED,
    POWER_ON_RESET,
    REPORTED_LUNS_DATA_HAS_CHANGED,
    UNIT_ATTENTIONS,
    CheckCondition,
    SenseCode,
    build_sense,
    device_error_check,
)
from lunastor.iscsi.scsi.types import (
    Nexus,
    ScsiCommand,
    ScsiResult,
    Status,
    TmfFunction,
    TmfResponse,
)

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], Any]  # the host's "run this in the background"


@dataclass(slots=True)
class NexusState:
    """What one logical unit remembers about one I_T nexus."""

    nexus: Nexus
    itid: ItNexus
    capacity_generation: int
    unit_attentions: list[SenseCode] = field(default_factory=list)
    lu: LogicalUnit | None = None

    def add_ua(self, code: SenseCode) -> None:
        if code not in self.unit_attentions:
            self.unit_attentions.append(code)


class LogicalUnit:
    """One LUN: a block device plus its identity and per-LU SCSI state."""

    def __init__(
        self,
        device: BlockDevice,
        *,
        naa_id: int,
        serial: str,
        vendor: str = "LUNASTOR",
        product: str = "VOLUME",
        revision: str = "0001",
        removable: bool = False,
        max_transfer_blocks: int | None = None,
        optimal_transfer_blocks: int | None = None,
        max_unmap_blocks: int = 1 << 20,
        max_unmap_descriptors: int = 256,
        max_write_same_blocks: int | None = None,
        max_compare_write_blocks: int = 255,
        physical_block_exponent: int = 0,
        pr_key: str | None = None,
    ) -> None:
        """`physical_block_exponent` is what READ CAPACITY(16) reports as logical blocks per
        physical block (2^n). It is 0 by default although the device's physical block is
        larger: libiscsi 1.19's GetLBAStatus.UnmapSingle only passes with 0. The Block Limits
        page still advertises the physical block as transfer and unmap granularity, which is
        what initiators align to."""
        nibble = naa_id >> 124 if naa_id >> 64 else naa_id >> 60
        if naa_id < 0 or naa_id >> 128 or nibble not in (5, 6):
            raise ValueError("naa_id must be an NAA 5 (64-bit) or NAA 6 (128-bit) identifier")
        for label, text in (("serial", serial), ("vendor", vendor), ("product", product)):
            if not text or not text.isascii() or not text.isprintable():
                raise ValueError(f"{label} must be printable ASCII")
        if not revision.isascii() or not revision.isprintable():
            raise ValueError("revision must be printable ASCII")
        self.device = device
        self.naa_id = naa_id
        self.serial = serial
        self.vendor = vendor
        self.product = product
        self.revision = revision
        self.removable = removable
        bs = device.block_size
        self.max_transfer_blocks = max_transfer_blocks or max(1, (8 << 20) // bs)
        self.optimal_transfer_blocks = optimal_transfer_blocks or max(1, (1 << 20) // bs)
        self.max_unmap_blocks = max_unmap_blocks
        self.max_unmap_descriptors = max_unmap_descriptors
        # below 65536 blocks: libiscsi WriteSame16.Unmap writes that many with one WRITE(16)
        # (beyond the transfer limit) when MAXIMUM WRITE SAME LENGTH allows it
        self.max_write_same_blocks = max_write_same_blocks or max(1, (16 << 20) // bs)
        self.max_compare_write_blocks = max_compare_write_blocks
        self.physical_block_exponent = physical_block_exponent
        # the LU's key in the reservation store: the same on every access point
        self.pr_key = pr_key or f"naa.{naa_id:x}"
        # mode parameters (MODE SELECT changes them for every nexus)
        self.write_cache = True  # caching page WCE
        self.descriptor_sense = False  # control page D_SENSE
        self.software_write_protect = False  # control page SWP
        # START STOP UNIT / PREVENT ALLOW MEDIUM REMOVAL
        self.started = True
        self.medium_present = True
        self.prevent: set[ItNexus] = set()
        self.nexuses: dict[Nexus, NexusState] = {}

    def apply_mode(self, values: tuple[bool, bool, bool]) -> None:
        """Mode parameters as MODE SELECT set them (through any access point)."""
        self.write_cache, self.descriptor_sense, self.software_write_protect = values

    @property
    def write_protected(self) -> bool:
        return self.device.read_only or self.software_write_protect

    def state_for(self, nexus: Nexus) -> NexusState:
        ns = self.nexuses.get(nexus)
        if ns is None:
            ns = NexusState(
                nexus,
                (nexus.initiator_port, nexus.target_port),
                self.device.capacity_generation,
                [POWER_ON_RESET],
                self,
            )
            self.nexuses[nexus] = ns
        return ns

    def ua_to_others(self, nexus: Nexus | None, code: SenseCode) -> None:
        for n, ns in self.nexuses.items():
            if n != nexus:
                ns.add_ua(code)

    def reset(self, code: SenseCode) -> None:
        """The local part of a LOGICAL UNIT RESET (or of a target reset); the SPC-2
        reservation it releases is in the reservation store."""
        self.prevent.clear()
        for ns in self.nexuses.values():
            ns.unit_attentions = [code]


class _Session:
    """Per Nexus object: its visible LUNs and per-LUN states, found without hashing the
    Nexus (a frozen dataclass hashes all its fields on every lookup)."""

    __slots__ = ("nexus", "states", "visible")

    def __init__(self, nexus: Nexus, visible: frozenset[int]) -> None:
        self.nexus = nexus
        self.visible = visible
        self.states: dict[int, NexusState] = {}


_SESSION_CACHE_LIMIT = 4096


def _reservation_conflict() -> ScsiResult:
    return ScsiResult(Status.RESERVATION_CONFLICT)


class ScsiTarget:
    """One iSCSI target's LUNs as seen by SCSI."""

    def __init__(
        self,
        name: str,
        luns: dict[int, LogicalUnit],
        *,
        relative_port: int = 1,
        reservations: ReservationStore | None = None,
        visible_luns: Callable[[Nexus], set[int]] | None = None,
        relative_ports: Callable[[], list[int]] | None = None,
        abort_tasks: Callable[[Nexus, int], None] | None = None,
        spawn: Spawn | None = None,
    ) -> None:
        """
        `relative_ports` lists every access point's relative port for REPORT TARGET PORT
        GROUPS (default: only ours); `abort_tasks(nexus, lun)` is called for each local nexus
        whose tasks PREEMPT AND ABORT aborts (the session layer aborts them). `spawn(coro)`
        runs a coroutine in the background and returns something to await it by (an
        asyncio task): the host's, since this package never imports asyncio. Without it,
        work that has to wait is run on the loop of the future it waits on.
        """
        self.name = name
        self.luns: dict[int, LogicalUnit] = dict(luns)
        self.relative_port = relative_port
        self.reservations: ReservationStore = reservations or InProcessReservations()
        self._visible_luns = visible_luns
        self._relative_ports = relative_ports
        self._abort_tasks = abort_tasks
        self._spawn = spawn
        self._visible: dict[Nexus, frozenset[int]] = {}
        self._sessions: dict[int, _Session] = {}  # id(nexus) -> cache; holds the nexus alive
        self._pending: set[Any] = set()  # what `spawn` returned, until awaited done
        self._lanes: list[FastLane] = []  # handed to the fast path; cleared on any event
        self.reservations.subscribe(self.reservation_changed)
        for lu in self.luns.values():
            self._adopt(lu)

    # -- visibility ----------------------------------------------------------------------
    def visible(self, nexus: Nexus) -> frozenset[int]:
        """The LUNs this nexus may see (LUN masking), cached until the LUN map changes."""
        v = self._visible.get(nexus)
        if v is None:
            if self._visible_luns is None:
                v = frozenset(self.luns)
            else:
                v = frozenset(self._visible_luns(nexus)) & frozenset(self.luns)
            self._visible[nexus] = v
        return v

    def lu_for(self, nexus: Nexus, lun: int) -> LogicalUnit | None:
        lu = self.luns.get(lun)
        if lu is None or lun not in self.visible(nexus):
            return None
        return lu

    def _session(self, nexus: Nexus) -> _Session:
        s = self._sessions.get(id(nexus))
        if s is not None and s.nexus is nexus:
            return s
        if len(self._sessions) >= _SESSION_CACHE_LIMIT:
            self._sessions.clear()  # sessions that build a Nexus per command: stay bounded
        s = self._sessions[id(nexus)] = _Session(nexus, self.visible(nexus))
        return s

    def fast_lane(self, nexus: Nexus, lun: int) -> FastLane | None:
        """The fast path's lane for `nexus` on `lun` (see `scsi.lane`), or None until a
        command of the nexus went through `execute` on that LUN (which establishes its
        state, e.g. the POWER ON unit attention every new nexus gets first)."""
        session = self._sessions.get(id(nexus))
        if session is None or session.nexus is not nexus:
            return None
        ns = session.states.get(lun)
        if ns is None or ns.lu is None:
            return None
        lane = FastLane(ns.lu, ns, self.reservations)
        self._lanes.append(lane)
        return lane

    def _clear_lanes(self) -> None:
        """Something changed that the fast path must not overlook: every lane goes."""
        for lane in self._lanes:
            lane.plain = False
        self._lanes.clear()

    def port_list(self) -> list[int]:
        ports = self._relative_ports() if self._relative_ports else [self.relative_port]
        return sorted(set(ports) | {self.relative_port})

    # -- the command path ----------------------------------------------------------------
    async def execute(self, cmd: ScsiCommand) -> ScsiResult:
        lu: LogicalUnit | None = None
        try:
            cdb = cmd.cdb
            spec = BY_OPCODE.get(cdb[0]) if cdb else None
            if spec is None:
                spec = commands.lookup(cdb)
            if len(cdb) < spec.cdb_length:  # handlers may then unpack without checks
                cmd.cdb = cdb = bytes(cdb).ljust(spec.cdb_length, b"\x00")
            nexus = cmd.nexus
            session = self._sessions.get(id(nexus))
            if session is None or session.nexus is not nexus:
                session = self._session(nexus)
            ns = session.states.get(cmd.lun)
            if ns is None:
                lun = cmd.lun
                lu = self.luns.get(lun) if lun in session.visible else None
                if lu is None:
                    if not spec.without_lu:
                        raise CheckCondition(LU_NOT_SUPPORTED)
                    spec.check_reserved(cmd.cdb)
                    return await spec.handler(self, None, cmd, None)
                ns = session.states[lun] = lu.state_for(cmd.nexus)
            else:
                lu = ns.lu
                assert lu is not None
            gen = lu.device.capacity_generation
            if gen != ns.capacity_generation:
                ns.capacity_generation = gen
                ns.add_ua(CAPACITY_DATA_HAS_CHANGED)
            if ns.unit_attentions and spec.unit_attention:
                raise CheckCondition(ns.unit_attentions.pop(0))
            access = spec.access
            if access is not Access.ALLOWED:
                state = self.reservations.current(lu.pr_key)
                holder = state.spc2_holder
                if holder is not None:
                    if holder != ns.itid and access is not Access.SPC2:
                        return _reservation_conflict()
                elif (
                    (access is Access.READ or access is Access.WRITE)
                    and state.type is not None
                    and conflicts(state, ns.itid, access is Access.WRITE)
                ):
                    return _reservation_conflict()
            spec.check_reserved(cdb)
            return await spec.handler(self, lu, cmd, ns)
        except CheckCondition as e:
            return self.check_condition(e, lu)
        except BlockDeviceError as e:
            return self.check_condition(device_error_check(e), lu)
        except ReservationConflict:
            return _reservation_conflict()
        except Exception:
            # A bug here must not take the session (or the daemon) down: the initiator gets
            # HARDWARE ERROR / INTERNAL TARGET FAILURE and retries or fails the I/O.
            log.exception("SCSI command %s failed", bytes(cmd.cdb[:16]).hex())
            return self.check_condition(CheckCondition(INTERNAL_TARGET_FAILURE), lu)

    def check_condition(self, e: CheckCondition, lu: LogicalUnit | None) -> ScsiResult:
        descriptor = lu is not None and lu.descriptor_sense
        return ScsiResult(
            Status.CHECK_CONDITION,
            sense=build_sense(e.code, e.field, e.information, descriptor=descriptor),
        )

    def reservation_changed(self, key: str, state: PrState) -> None:
        """Store callback: apply a committed transition's effects to our nexuses."""
        self._clear_lanes()
        aborted = set(state.aborts)
        for lun, lu in self.luns.items():
            if lu.pr_key != key:
                continue
            if state.mode is not None:
                lu.apply_mode(state.mode)
            for itid, asc, ascq in state.notices:
                code = UNIT_ATTENTIONS[(asc, ascq)]
                for ns in lu.nexuses.values():
                    if ns.itid != itid:
                        ns.add_ua(code)
            for port, asc, ascq in state.resets:
                if port != self.relative_port:  # where it happened, it was applied at once
                    lu.reset(UNIT_ATTENTIONS[(asc, ascq)])
            for itid, asc, ascq in state.events:
                code = UNIT_ATTENTIONS[(asc, ascq)]
                for ns in lu.nexuses.values():
                    if ns.itid == itid:
                        ns.add_ua(code)
            if aborted and self._abort_tasks is not None:
                for ns in list(lu.nexuses.values()):
                    if ns.itid in aborted:
                        self._abort_tasks(ns.nexus, lun)

    def close(self) -> None:
        """Stop listening to the reservation store (the target is going away)."""
        self.reservations.unsubscribe(self.reservation_changed)

    # -- task management and nexus life --------------------------------------------------
    def task_management(self, nexus: Nexus, function: TmfFunction, lun: int) -> TmfResponse:
        """SCSI-level effects of a task management function (the session aborts tasks)."""
        self._clear_lanes()
        if function in (TmfFunction.ABORT_TASK, TmfFunction.ABORT_TASK_SET):
            return TmfResponse.COMPLETE
        if function == TmfFunction.CLEAR_TASK_SET:
            # TST=001b: each nexus has its own task set, so no other nexus is affected
            return TmfResponse.COMPLETE
        if function == TmfFunction.LOGICAL_UNIT_RESET:
            lu = self.lu_for(nexus, lun)
            if lu is None:
                return TmfResponse.LUN_DOES_NOT_EXIST
            self._reset(lu, BUS_DEVICE_RESET)
            return TmfResponse.COMPLETE
        if function in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            for lu in {id(lu): lu for lu in self.luns.values()}.values():
                self._reset(lu, POWER_ON_RESET)
            return TmfResponse.COMPLETE
        if function == TmfFunction.TASK_REASSIGN:
            return TmfResponse.REASSIGNMENT_NOT_SUPPORTED
        return TmfResponse.NOT_SUPPORTED  # CLEAR ACA: NormACA is not supported

    def _reset(self, lu: LogicalUnit, code: SenseCode) -> None:
        """Reset `lu` here at once, and through the store everywhere else (the SPC-2
        reservation ends, every other access point's nexuses get `code`)."""
        lu.reset(code)
        reset = (self.relative_port, code.asc, code.ascq)

        def change(state: PrState) -> PrState:
            return replace(state, spc2_holder=None, resets=(reset,))

        self._in_background(update(self.reservations, lu.pr_key, change))

    def _in_background(self, work: Coroutine[Any, Any, object]) -> None:
        """Run a store update started by a synchronous entry point (a TMF, a lost nexus):
        its first step now (an in-process store finishes there), the rest through the host's
        `spawn`, which `settle()` waits for."""
        try:
            waiting = work.send(None)
        except StopIteration:
            return
        except Exception:
            log.exception("reservation store update failed")
            return

        async def rest() -> None:
            try:
                await Resumed(work, waiting)
            except Exception:
                log.exception("reservation store update failed")

        spawn = self._spawn
        if spawn is None:
            get_loop = getattr(waiting, "get_loop", None)
            if get_loop is None:
                work.close()
                log.error("reservation store update needs a spawn callback; abandoned")
                return
            spawn = get_loop().create_task
        self._pending.add(spawn(rest()))

    async def settle(self) -> None:
        """Wait for the store updates that task management and lost nexuses started (the
        session answers a LOGICAL UNIT RESET only once every access point applied it)."""
        while self._pending:
            for handle in list(self._pending):
                try:
                    await handle
                except BaseException:
                    if not handle.done():
                        raise  # our own cancellation, not the update's end
                self._pending.discard(handle)

    def nexus_lost(self, nexus: Nexus) -> None:
        """The session ended: SPC-2 reservations and medium-removal prevention held through
        this nexus end with it; persistent reservations and registrations stay (SPC-4)."""
        self._clear_lanes()
        itid = (nexus.initiator_port, nexus.target_port)
        for lu in {id(lu): lu for lu in self.luns.values()}.values():
            lu.nexuses.pop(nexus, None)
            lu.prevent.discard(itid)
            if any(ns.itid == itid for ns in lu.nexuses.values()):
                continue  # another session of the same I_T nexus is still here

            def release(state: PrState) -> PrState:
                if state.spc2_holder != itid:
                    return state
                return replace(state, spc2_holder=None)

            try:
                held = self.reservations.current(lu.pr_key).spc2_holder == itid
            except CheckCondition:  # the store cannot vouch for its copy: ask it
                held = True
            if held:
                self._in_background(update(self.reservations, lu.pr_key, release))
        self._visible.pop(nexus, None)
        for key in [k for k, s in self._sessions.items() if s.nexus == nexus]:
            del self._sessions[key]

    # -- LUN map changes -----------------------------------------------------------------
    def set_luns(self, luns: dict[int, LogicalUnit]) -> None:
        self._change_luns(dict(luns))

    def add_lun(self, lun: int, lu: LogicalUnit) -> None:
        luns = dict(self.luns)
        luns[lun] = lu
        self._change_luns(luns)

    def remove_lun(self, lun: int) -> None:
        luns = dict(self.luns)
        luns.pop(lun, None)
        self._change_luns(luns)

    def visibility_changed(self) -> None:
        """Call when `visible_luns` answers differently (ACL change): same UA rules."""
        self._change_luns(self.luns)

    def _adopt(self, lu: LogicalUnit) -> None:
        """A LU joins this target: take the mode parameters the store has for it."""
        try:
            values = self.reservations.current(lu.pr_key).mode
        except CheckCondition:
            return  # the store catches up and reports the state to `reservation_changed`
        if values is not None:
            lu.apply_mode(values)

    def _change_luns(self, luns: dict[int, LogicalUnit]) -> None:
        self._clear_lanes()
        known = {n for lu in self.luns.values() for n in lu.nexuses} | set(self._visible)
        before = {n: self.visible(n) for n in known}
        for lu in luns.values():
            if all(lu is not old for old in self.luns.values()):
                self._adopt(lu)
        self.luns = luns
        self._visible.clear()
        self._sessions.clear()
        for n in known:
            after = self.visible(n)
            if after == before[n]:
                continue
            for lun in after:
                self.luns[lun].state_for(n).add_ua(REPORTED_LUNS_DATA_HAS_CHANGED)


assert handlers.__all__  # imported for the command table it fills
