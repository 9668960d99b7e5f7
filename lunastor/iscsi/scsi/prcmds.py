"""PERSISTENT RESERVE IN/OUT (SPC-4 6.15, 6.16) and RESERVE/RELEASE(6)/(10) (SPC-2).

The logic is in `pr.py`; here the CDB and parameter list are decoded, the state loaded from
the `ReservationStore`, transformed, swapped back (retrying on a lost compare-and-swap), and
the store tells every subscribed target (every access point) about the new state, whose
`events`/`aborts` carry the effects (unit attentions, task aborts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from lunastor.iscsi.scsi.commands import Access, command, data_result
from lunastor.iscsi.scsi.pr import (
    ItNexus,
    PrOutRequest,
    PrState,
    PrType,
    ReservationConflict,
    ServiceAction,
    apply_out,
)
from lunastor.iscsi.scsi.reservations import ReservationsBusy, update
from lunastor.iscsi.scsi.sense import (
    INTERNAL_TARGET_FAILURE,
    PARAMETER_LIST_LENGTH_ERROR,
    CheckCondition,
    invalid_cdb,
    invalid_param,
)
from lunastor.iscsi.scsi.types import ScsiResult

if TYPE_CHECKING:
    from lunastor.iscsi.scsi.target import LogicalUnit, NexusState, ScsiTarget
    from lunastor.iscsi.scsi.types import ScsiCommand

PROTOCOL_ISCSI = 0x5
_CAS_ATTEMPTS = 32

# -- PERSISTENT RESERVE IN ----------------------------------------------------------------


def read_keys(state: PrState) -> bytes:
    keys = b"".join(r.key.to_bytes(8, "big") for r in state.registrations.values())
    return state.generation.to_bytes(4, "big") + len(keys).to_bytes(4, "big") + keys


def read_reservation(state: PrState) -> bytes:
    head = state.generation.to_bytes(4, "big")
    if state.type is None:
        return head + bytes(4)
    key = 0
    if not state.type.all_registrants and state.holder is not None:
        key = state.registrations[state.holder].key
    body = key.to_bytes(8, "big") + bytes(4) + bytes((0, state.type & 0x0F)) + bytes(2)
    return head + len(body).to_bytes(4, "big") + body


def report_capabilities(persistent: bool, state: PrState) -> bytes:
    data = bytearray(8)
    data[1] = 8
    # CRH 0, SIP_C 0, ATP_C 1, PTPL_C as the store allows
    data[2] = 0x04 | (0x01 if persistent else 0)
    # TMV 1, ALLOW COMMANDS 001b (TEST UNIT READY passes WE/EA), PTPL_A
    data[3] = 0x80 | 0x10 | (0x01 if state.aptpl else 0)
    data[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02  # WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX
    data[5] = 0x01  # EX_AC_AR
    return bytes(data)


def transport_id(initiator_port: str) -> bytes:
    """An iSCSI TransportID, format 01b: the initiator port name with its ISID."""
    name = initiator_port.encode("utf-8") + b"\x00"
    name = name.ljust(max(20, (len(name) + 3) // 4 * 4), b"\x00")
    return bytes((0x40 | PROTOCOL_ISCSI, 0)) + len(name).to_bytes(2, "big") + name


def read_full_status(state: PrState) -> bytes:
    out = bytearray()
    for nexus, reg in state.registrations.items():
        holder = state.is_holder(nexus)
        tid = transport_id(nexus[0])
        desc = bytearray(24)
        desc[0:8] = reg.key.to_bytes(8, "big")
        desc[12] = (0x02 if reg.all_tg_pt else 0) | (0x01 if holder else 0)
        if holder and state.type is not None:
            desc[13] = state.type & 0x0F
        desc[18:20] = reg.relative_port.to_bytes(2, "big")
        desc[20:24] = len(tid).to_bytes(4, "big")
        out += desc + tid
    return state.generation.to_bytes(4, "big") + len(out).to_bytes(4, "big") + bytes(out)


_PRIN_USAGE = [0x5E, 0x00, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x00]


async def persistent_reserve_in(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None
    sa = cmd.cdb[1] & 0x1F
    alloc = int.from_bytes(cmd.cdb[7:9], "big")
    store = target.reservations
    _, state = await store.load(lu.pr_key)
    if sa == 0:
        data = read_keys(state)
    elif sa == 1:
        data = read_reservation(state)
    elif sa == 2:
        data = report_capabilities(store.persistent, state)
    else:
        data = read_full_status(state)
    return data_result(data, alloc)


for _sa, _name in enumerate(
    ("READ KEYS", "READ RESERVATION", "REPORT CAPABILITIES", "READ FULL STATUS")
):
    _usage = list(_PRIN_USAGE)
    _usage[1] = _sa
    command(
        0x5E,
        f"PERSISTENT RESERVE IN ({_name})",
        _usage,
        service_action=_sa,
        access=Access.SPC2_ONLY,
    )(persistent_reserve_in)


# -- PERSISTENT RESERVE OUT ---------------------------------------------------------------


def parse_transport_id(data: bytes, offset: int) -> str:
    """The initiator port name in an iSCSI TransportID (format 01b) at `offset`."""
    if len(data) < offset + 4:
        raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
    if data[offset] & 0x0F != PROTOCOL_ISCSI:
        raise invalid_param(offset, 3)
    if data[offset] >> 6 != 1:
        raise invalid_param(offset, 7)  # format 00b names no ISID, so no initiator port
    length = int.from_bytes(data[offset + 2 : offset + 4], "big")
    raw = data[offset + 4 : offset + 4 + length]
    if len(raw) < length:
        raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
    name = raw.split(b"\x00", 1)[0].decode("utf-8", "replace")
    iqn, sep, isid = name.partition(",i,0x")
    if not sep or not iqn:
        raise invalid_param(offset + 4)
    try:
        value = int(isid, 16)
    except ValueError:
        raise invalid_param(offset + 4) from None
    # the name as the initiator spells it (it logged in with the same one); the ISID canonical
    return f"{iqn},i,0x{value:012x}"


def parse_out(target: ScsiTarget, cmd: ScsiCommand, issuer: ItNexus) -> tuple[PrOutRequest, int]:
    cdb = cmd.cdb
    sa = ServiceAction(cdb[1] & 0x1F)
    scope, ptype = cdb[2] >> 4, cdb[2] & 0x0F
    length = int.from_bytes(cdb[5:9], "big")
    if sa in (
        ServiceAction.RESERVE,
        ServiceAction.RELEASE,
        ServiceAction.PREEMPT,
        ServiceAction.PREEMPT_AND_ABORT,
    ):
        if scope != 0:
            raise invalid_cdb(2, 7)  # only LU_SCOPE
        if ptype not in PrType.__members__.values():
            raise invalid_cdb(2, 3)
    if sa == ServiceAction.REGISTER_AND_MOVE:
        if length < 24:
            raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
    elif length != 24:
        raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
    data = bytes(cmd.data_out[:length])
    if len(data) < length:
        raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
    key = int.from_bytes(data[0:8], "big")
    sa_key = int.from_bytes(data[8:16], "big")
    if sa == ServiceAction.REGISTER_AND_MOVE:
        unreg, aptpl = bool(data[17] & 0x02), bool(data[17] & 0x01)
        rel_port = int.from_bytes(data[18:20], "big")
        if rel_port not in target.port_list():
            raise invalid_param(18)
        tid_len = int.from_bytes(data[20:24], "big")
        if len(data) < 24 + tid_len:
            raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
        initiator = parse_transport_id(data, 24)
        req = PrOutRequest(
            sa, ptype, key, sa_key, aptpl, False, unreg, (initiator, issuer[1]), rel_port
        )
        return req, length
    flags = data[20]
    if flags & 0x08:
        raise invalid_param(20, 3)  # SPEC_I_PT is not supported (SIP_C=0)
    all_tg_pt = bool(flags & 0x04) and sa in (
        ServiceAction.REGISTER,
        ServiceAction.REGISTER_AND_IGNORE_EXISTING_KEY,
    )
    return PrOutRequest(sa, ptype, key, sa_key, bool(flags & 0x01), all_tg_pt), length


async def persistent_reserve_out(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None and ns is not None
    req, length = parse_out(target, cmd, ns.itid)
    store = target.reservations
    for _ in range(_CAS_ATTEMPTS):
        version, state = await store.load(lu.pr_key)
        new, _ = apply_out(
            state, ns.itid, cmd.nexus.relative_port, req, persistent=store.persistent
        )
        if new is state:
            return ScsiResult(transfer_length=length)
        if await store.compare_and_swap(lu.pr_key, version, new):
            # the store reports the change (with its effects) to every subscribed target
            return ScsiResult(transfer_length=length)
    raise CheckCondition(INTERNAL_TARGET_FAILURE)


for _sa in ServiceAction:
    command(
        0x5F,
        f"PERSISTENT RESERVE OUT ({_sa.name.replace('_', ' ')})",
        [0x5F, _sa, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x00],
        service_action=int(_sa),
        access=Access.PR_OUT,
    )(persistent_reserve_out)


# -- RESERVE / RELEASE (SPC-2) ------------------------------------------------------------


async def _spc2_reserve(target: ScsiTarget, lu: LogicalUnit, ns: NexusState) -> ScsiResult:
    def reserve(state: PrState) -> PrState:
        # CRH=0 (SPC-4 5.12.3): while any I_T nexus is registered, RESERVE and RELEASE conflict
        if state.registrations:
            raise ReservationConflict()
        if state.spc2_holder == ns.itid:
            return state
        if state.spc2_holder is not None:
            raise ReservationConflict()
        return replace(state, spc2_holder=ns.itid)

    await _update(target, lu, reserve)
    return ScsiResult()


async def _spc2_release(target: ScsiTarget, lu: LogicalUnit, ns: NexusState) -> ScsiResult:
    def release(state: PrState) -> PrState:
        if state.registrations:
            raise ReservationConflict()
        if state.spc2_holder != ns.itid:
            return state  # releasing someone else's reservation is a no-op
        return replace(state, spc2_holder=None)

    await _update(target, lu, release)
    return ScsiResult()


async def _update(
    target: ScsiTarget, lu: LogicalUnit, change: Callable[[PrState], PrState]
) -> None:
    try:
        await update(target.reservations, lu.pr_key, change)
    except ReservationsBusy:
        raise CheckCondition(INTERNAL_TARGET_FAILURE) from None


@command(0x16, "RESERVE(6)", [0x16, 0, 0, 0, 0, 0x00], access=Access.SPC2)
async def reserve6(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None and ns is not None
    return await _spc2_reserve(target, lu, ns)


@command(0x17, "RELEASE(6)", [0x17, 0, 0, 0, 0, 0x00], access=Access.SPC2)
async def release6(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None and ns is not None
    return await _spc2_release(target, lu, ns)


@command(0x56, "RESERVE(10)", [0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0x00], access=Access.SPC2)
async def reserve10(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None and ns is not None
    return await _spc2_reserve(target, lu, ns)


@command(0x57, "RELEASE(10)", [0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0x00], access=Access.SPC2)
async def release10(
    target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand, ns: NexusState | None
) -> ScsiResult:
    assert lu is not None and ns is not None
    return await _spc2_release(target, lu, ns)
