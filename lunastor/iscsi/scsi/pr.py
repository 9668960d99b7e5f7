"""Persistent reservations (SPC-4 5.12), as pure functions over a state object.

The state of one logical unit is an immutable `PrState`; every PERSISTENT RESERVE OUT service
action is a function `(state, nexus, request) -> (new state, effects)` that raises
`CheckCondition` or `ReservationConflict`. The store (`reservations.py`) only loads and
compare-and-swaps states, so the same logic serves the in-process store and the etcd one.

I_T nexus identity is (initiator port name, target port name). Every lunastor access point
uses target portal group tag 1, so the iSCSI target port name "<iqn>,t,0x0001" is the same on
all of them: one SCSI target port, reached through several relative port identifiers. Hence
ALL_TG_PT=1 is accepted and means the same as 0 (ATP_C=1), SPEC_I_PT is not supported
(SIP_C=0), APTPL is accepted only when the store is persistent (PTPL_C follows the store).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntEnum

from lunastor.iscsi.scsi.sense import (
    INVALID_RELEASE_OF_PR,
    REGISTRATIONS_PREEMPTED,
    RESERVATIONS_PREEMPTED,
    RESERVATIONS_RELEASED,
    CheckCondition,
    SenseCode,
    invalid_cdb,
    invalid_param,
)

ItNexus = tuple[str, str]  # (initiator port name, target port name)


class ReservationConflict(Exception):
    """The command ends with RESERVATION CONFLICT status."""


class PrType(IntEnum):
    WRITE_EXCLUSIVE = 1
    EXCLUSIVE_ACCESS = 3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8

    @property
    def all_registrants(self) -> bool:
        return self in (
            PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
            PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
        )

    @property
    def registrants(self) -> bool:
        """Registrants-only or all-registrants: every registrant may access."""
        return self >= PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY

    @property
    def exclusive_access(self) -> bool:
        return self in (
            PrType.EXCLUSIVE_ACCESS,
            PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
            PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
        )


class ServiceAction(IntEnum):
    REGISTER = 0
    RESERVE = 1
    RELEASE = 2
    CLEAR = 3
    PREEMPT = 4
    PREEMPT_AND_ABORT = 5
    REGISTER_AND_IGNORE_EXISTING_KEY = 6
    REGISTER_AND_MOVE = 7


@dataclass(frozen=True, slots=True)
class Registration:
    key: int
    relative_port: int  # the access point it registered through (READ FULL STATUS)
    all_tg_pt: bool = False


@dataclass(frozen=True, slots=True)
class PrState:
    """Reservation state of one logical unit. Treat as immutable: transitions copy."""

    generation: int = 0
    registrations: dict[ItNexus, Registration] = field(default_factory=dict)
    holder: ItNexus | None = None  # the reserving nexus (any registrant for *_ALL_REGISTRANTS)
    type: PrType | None = None
    aptpl: bool = False
    # What the transition that produced this state did to other nexuses, so that every access
    # point (not only the one that ran the command) can apply it: unit attentions as
    # (nexus, ASC, ASCQ) and the nexuses whose tasks PREEMPT AND ABORT aborted.
    events: tuple[tuple[ItNexus, int, int], ...] = ()
    aborts: tuple[ItNexus, ...] = ()
    # SPC-2 RESERVE(6)/(10): the one nexus holding the LU (not a persistent reservation, but
    # kept here so that every access point enforces it). Changing it leaves `generation`.
    spc2_holder: ItNexus | None = None
    # Resets that the transition carries, as (relative port it happened through, ASC, ASCQ):
    # every nexus of the LU on every access point gets that unit attention (its queue is
    # replaced, as a reset does) and medium-removal prevention ends. The access point it
    # happened through applied it already.
    resets: tuple[tuple[int, int, int], ...] = ()
    # Mode parameters MODE SELECT set, which every access point applies: (WCE, D_SENSE, SWP);
    # None until one is changed (the defaults). Not a reservation either, but LU state all
    # access points must agree on.
    mode: tuple[bool, bool, bool] | None = None
    # unit attentions for every nexus of the LU but the one that caused them (MODE PARAMETERS
    # CHANGED): (that nexus, ASC, ASCQ)
    notices: tuple[tuple[ItNexus, int, int], ...] = ()

    @property
    def reserved(self) -> bool:
        return self.type is not None

    def is_holder(self, nexus: ItNexus) -> bool:
        if self.type is None:
            return False
        if self.type.all_registrants:
            return nexus in self.registrations
        return self.holder == nexus

    def to_dict(self) -> dict[str, object]:
        """A plain form for stores that serialise (msgpack/JSON)."""
        return {
            "v": 1,
            "generation": self.generation,
            "registrations": [
                [n[0], n[1], r.key, r.relative_port, r.all_tg_pt]
                for n, r in self.registrations.items()
            ],
            "holder": list(self.holder) if self.holder else None,
            "type": int(self.type) if self.type is not None else None,
            "aptpl": self.aptpl,
            "events": [[n[0], n[1], asc, ascq] for n, asc, ascq in self.events],
            "aborts": [list(n) for n in self.aborts],
            "spc2": list(self.spc2_holder) if self.spc2_holder else None,
            "resets": [list(r) for r in self.resets],
            "mode": list(self.mode) if self.mode is not None else None,
            "notices": [[n[0], n[1], asc, ascq] for n, asc, ascq in self.notices],
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> PrState:
        regs = {
            (str(i), str(t)): Registration(int(k), int(p), bool(a))
            for i, t, k, p, a in d["registrations"]  # type: ignore[attr-defined]
        }
        holder = d.get("holder")
        ptype = d.get("type")
        spc2 = d.get("spc2")
        mode = d.get("mode")
        return cls(
            int(d["generation"]),  # type: ignore[call-overload]
            regs,
            (str(holder[0]), str(holder[1])) if holder else None,  # type: ignore[index]
            PrType(ptype) if ptype is not None else None,  # type: ignore[arg-type]
            bool(d.get("aptpl")),
            tuple(
                ((str(i), str(t)), int(asc), int(ascq))
                for i, t, asc, ascq in d.get("events", ())  # type: ignore[attr-defined]
            ),
            tuple((str(i), str(t)) for i, t in d.get("aborts", ())),  # type: ignore[attr-defined]
            (str(spc2[0]), str(spc2[1])) if spc2 else None,  # type: ignore[index]
            tuple(
                (int(port), int(asc), int(ascq))
                for port, asc, ascq in d.get("resets", ())  # type: ignore[attr-defined]
            ),
            (bool(mode[0]), bool(mode[1]), bool(mode[2])) if mode else None,  # type: ignore[index]
            tuple(
                ((str(i), str(t)), int(asc), int(ascq))
                for i, t, asc, ascq in d.get("notices", ())  # type: ignore[attr-defined]
            ),
        )

    def quiet(self) -> PrState:
        """This state without a transition's effects (what a new transition starts from)."""
        if not self.events and not self.aborts and not self.resets and not self.notices:
            return self
        return replace(self, events=(), aborts=(), resets=(), notices=())


EMPTY = PrState()


@dataclass(frozen=True, slots=True)
class PrOutRequest:
    service_action: ServiceAction
    type: int  # raw TYPE field (validated per service action)
    key: int  # RESERVATION KEY
    sa_key: int  # SERVICE ACTION RESERVATION KEY
    aptpl: bool = False
    all_tg_pt: bool = False
    # REGISTER AND MOVE
    unreg: bool = False
    move_to: ItNexus | None = None
    move_relative_port: int = 0


@dataclass(slots=True)
class PrEffects:
    """What else happens when a transition commits: unit attentions and task aborts."""

    unit_attentions: list[tuple[ItNexus, SenseCode]] = field(default_factory=list)
    abort_nexuses: list[ItNexus] = field(default_factory=list)


def _type(raw: int) -> PrType:
    try:
        return PrType(raw)
    except ValueError:
        raise invalid_cdb(2, 3) from None


def _check_registered(state: PrState, nexus: ItNexus, key: int) -> Registration:
    reg = state.registrations.get(nexus)
    if reg is None or reg.key != key:
        raise ReservationConflict()
    return reg


def _without(state: PrState, removed: set[ItNexus]) -> dict[ItNexus, Registration]:
    return {n: r for n, r in state.registrations.items() if n not in removed}


def _unregister(state: PrState, nexus: ItNexus, effects: PrEffects) -> PrState:
    regs = _without(state, {nexus})
    holder, ptype = state.holder, state.type
    if ptype is not None:
        if ptype.all_registrants:
            if not regs:  # the last registrant of an all-registrants reservation
                holder, ptype = None, None
        elif state.holder == nexus:
            if ptype.registrants:  # registrants-only: the others lose their access
                effects.unit_attentions += [(n, RESERVATIONS_RELEASED) for n in regs]
            holder, ptype = None, None
    return replace(
        state, generation=state.generation + 1, registrations=regs, holder=holder, type=ptype
    )


def apply_out(
    state: PrState, nexus: ItNexus, relative_port: int, req: PrOutRequest, *, persistent: bool
) -> tuple[PrState, PrEffects]:
    """Execute one PERSISTENT RESERVE OUT service action against `state`.

    Returns `state` itself when nothing changes; otherwise a new state carrying the
    transition's effects in `events`/`aborts` (and the same effects separately)."""
    new, effects = _apply_out(state, nexus, relative_port, req, persistent=persistent)
    if new is state:
        return state, effects
    events = tuple((n, code.asc, code.ascq) for n, code in effects.unit_attentions)
    aborts = tuple(effects.abort_nexuses)
    return replace(new, events=events, aborts=aborts, resets=(), notices=()), effects


def _apply_out(
    state: PrState, nexus: ItNexus, relative_port: int, req: PrOutRequest, *, persistent: bool
) -> tuple[PrState, PrEffects]:
    effects = PrEffects()
    sa = req.service_action
    if req.aptpl and not persistent:
        raise invalid_param(20, 0)
    if sa in (ServiceAction.REGISTER, ServiceAction.REGISTER_AND_IGNORE_EXISTING_KEY):
        reg = state.registrations.get(nexus)
        if sa == ServiceAction.REGISTER:
            if reg is None and req.key != 0:
                raise ReservationConflict()
            if reg is not None and reg.key != req.key:
                raise ReservationConflict()
        if req.sa_key == 0:
            if reg is None:
                return state, effects
            new = _unregister(state, nexus, effects)
            return replace(new, aptpl=req.aptpl), effects
        regs = dict(state.registrations)
        regs[nexus] = Registration(req.sa_key, relative_port, req.all_tg_pt)
        return (
            replace(state, generation=state.generation + 1, registrations=regs, aptpl=req.aptpl),
            effects,
        )

    reg = _check_registered(state, nexus, req.key)
    if sa == ServiceAction.RESERVE:
        ptype = _type(req.type)
        if state.type is None:
            return replace(state, holder=nexus, type=ptype), effects
        if state.is_holder(nexus) and state.type == ptype:
            return state, effects
        raise ReservationConflict()

    if sa == ServiceAction.RELEASE:
        if state.type is None or not state.is_holder(nexus):
            return state, effects
        if state.type != req.type:
            raise CheckCondition(INVALID_RELEASE_OF_PR)
        if state.type.registrants:
            effects.unit_attentions += [
                (n, RESERVATIONS_RELEASED) for n in state.registrations if n != nexus
            ]
        return replace(state, holder=None, type=None), effects

    if sa == ServiceAction.CLEAR:
        effects.unit_attentions += [
            (n, RESERVATIONS_PREEMPTED) for n in state.registrations if n != nexus
        ]
        return (
            replace(
                state, generation=state.generation + 1, registrations={}, holder=None, type=None
            ),
            effects,
        )

    if sa in (ServiceAction.PREEMPT, ServiceAction.PREEMPT_AND_ABORT):
        return _preempt(state, nexus, req, effects, abort=sa == ServiceAction.PREEMPT_AND_ABORT)

    if sa == ServiceAction.REGISTER_AND_MOVE:
        return _register_and_move(state, nexus, reg, req, effects)
    raise invalid_cdb(1, 4)


def _preempt(
    state: PrState, nexus: ItNexus, req: PrOutRequest, effects: PrEffects, *, abort: bool
) -> tuple[PrState, PrEffects]:
    ptype = _type(req.type)
    target_key = req.sa_key
    holder, rtype = state.holder, state.type

    def remove_matching(exclude_self: bool) -> set[ItNexus]:
        return {
            n
            for n, r in state.registrations.items()
            if r.key == target_key and not (exclude_self and n == nexus)
        }

    if rtype is not None and rtype.all_registrants and target_key == 0:
        # preempt an all-registrants reservation: everyone else goes, we hold it
        removed = {n for n in state.registrations if n != nexus}
        holder, rtype = nexus, ptype
    elif (
        rtype is not None
        and not rtype.all_registrants
        and state.holder is not None
        and (state.registrations[state.holder].key == target_key)
    ):
        removed = remove_matching(exclude_self=True)
        old_type = rtype
        holder, rtype = nexus, ptype
        if old_type != ptype:
            effects.unit_attentions += [
                (n, RESERVATIONS_RELEASED)
                for n in state.registrations
                if n != nexus and n not in removed
            ]
    else:
        if target_key == 0:
            raise invalid_param(8)
        removed = remove_matching(exclude_self=False)
        if not removed:
            raise ReservationConflict()
        removed.discard(nexus)  # the preempting nexus keeps its own registration
    effects.unit_attentions += [(n, REGISTRATIONS_PREEMPTED) for n in removed]
    if abort:
        effects.abort_nexuses += sorted(removed)
    regs = _without(state, removed)
    if rtype is not None and rtype.all_registrants and not regs:
        holder, rtype = None, None
    if rtype is not None and not rtype.all_registrants and holder not in regs:
        holder, rtype = None, None
    return (
        replace(
            state, generation=state.generation + 1, registrations=regs, holder=holder, type=rtype
        ),
        effects,
    )


def _register_and_move(
    state: PrState, nexus: ItNexus, reg: Registration, req: PrOutRequest, effects: PrEffects
) -> tuple[PrState, PrEffects]:
    if state.type is None or state.type.all_registrants or state.holder != nexus:
        raise ReservationConflict()
    if req.sa_key == 0:
        raise invalid_param(8)
    if req.move_to is None or req.move_to == nexus:
        raise invalid_param(24)
    regs = dict(state.registrations)
    regs[req.move_to] = Registration(req.sa_key, req.move_relative_port)
    if req.unreg:
        del regs[nexus]
    return (
        replace(state, generation=state.generation + 1, registrations=regs, holder=req.move_to),
        effects,
    )


def conflicts(state: PrState, nexus: ItNexus, write: bool) -> bool:
    """Whether a READ-class (write=False) or WRITE-class command from `nexus` conflicts.

    SPC-4 5.12.5 tables 5.13/5.14 collapsed onto two classes: registrants of *_REGISTRANTS_*
    and *_ALL_REGISTRANTS types access as the holder does; others may read under the WRITE
    EXCLUSIVE types and nothing under the EXCLUSIVE ACCESS types.
    """
    ptype = state.type
    if ptype is None:
        return False
    if state.holder == nexus:
        return False
    if ptype.registrants and nexus in state.registrations:
        return False
    return write or ptype.exclusive_access
