"""Model-based test of persistent reservations: a small independent model of SPC-4 5.12
against the target, driven through real PERSISTENT RESERVE IN/OUT, READ and WRITE CDBs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from lunastor.iscsi.scsi.types import Nexus, Status
from tests.unit.scsi.harness import TARGET, Reply, Rig

NEXUSES = [Nexus(f"iqn.2026-01.io.test:n{i}", 0x1000 + i, TARGET) for i in range(3)]
KEYS = st.sampled_from([0, 1, 2, 3])
TYPES = st.sampled_from([1, 3, 5, 6, 7, 8])
AR = {7, 8}
REGISTRANTS = {5, 6, 7, 8}
EXCLUSIVE_ACCESS = {3, 6, 8}
CONFLICT = "conflict"
GOOD = "good"
INVALID_RELEASE = (5, 0x26, 0x04)
INVALID_PARAM = (5, 0x26, 0x00)


@dataclass
class Model:
    regs: dict[int, int] = field(default_factory=dict)  # nexus index -> key
    holder: int | None = None
    type: int | None = None
    generation: int = 0

    def is_holder(self, n: int) -> bool:
        if self.type is None:
            return False
        return n in self.regs if self.type in AR else self.holder == n

    def may_write(self, n: int) -> bool:
        if self.type is None or self.is_holder(n):
            return True
        return self.type in REGISTRANTS and n in self.regs

    def may_read(self, n: int) -> bool:
        return self.may_write(n) or self.type not in EXCLUSIVE_ACCESS

    def unregister(self, n: int) -> None:
        del self.regs[n]
        if self.type is not None:
            if self.type in AR:
                if not self.regs:
                    self.holder = self.type = None
            elif self.holder == n:
                self.holder = self.type = None


def prout(sa: int, ptype: int, key: int, sa_key: int) -> tuple[list[int], bytes]:
    cdb = [0x5F, sa, ptype, 0, 0, 0, 0, 0, 24, 0]
    return cdb, key.to_bytes(8, "big") + sa_key.to_bytes(8, "big") + bytes(8)


class PrMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.rig = Rig(num_blocks=64)
        self.model = Model()
        for n in NEXUSES:
            self.loop.run_until_complete(self.rig.ready(n))

    def teardown(self) -> None:
        self.loop.close()

    def reply(self, n: int, cdb: list[int], data: bytes = b"") -> Reply:
        r = self.loop.run_until_complete(self.rig.cmd(cdb, data, nexus=NEXUSES[n]))
        while r.status == Status.CHECK_CONDITION and r.ksa[0] == 6:  # a unit attention
            r = self.loop.run_until_complete(self.rig.cmd(cdb, data, nexus=NEXUSES[n]))
        return r

    def send(self, n: int, cdb: list[int], data: bytes = b"") -> object:
        r = self.reply(n, cdb, data)
        if r.status == Status.RESERVATION_CONFLICT:
            return CONFLICT
        if r.status == Status.GOOD:
            return GOOD
        return r.ksa

    # -- the model's side of each service action ------------------------------------------
    def expect_register(self, n: int, key: int, sa_key: int, ignore: bool) -> object:
        m = self.model
        registered = n in m.regs
        if not ignore and ((not registered and key) or (registered and m.regs[n] != key)):
            return CONFLICT
        if not sa_key:
            if registered:
                m.unregister(n)
                m.generation += 1
            return GOOD
        m.regs[n] = sa_key
        m.generation += 1
        return GOOD

    def registered_with(self, n: int, key: int) -> bool:
        return self.model.regs.get(n) == key and n in self.model.regs

    @rule(n=st.integers(0, 2), key=KEYS, sa_key=KEYS, ignore=st.booleans())
    def register(self, n: int, key: int, sa_key: int, ignore: bool) -> None:
        expected = self.expect_register(n, key, sa_key, ignore)
        assert self.send(n, *prout(6 if ignore else 0, 0, key, sa_key)) == expected

    @rule(n=st.integers(0, 2), key=KEYS, ptype=TYPES)
    def reserve(self, n: int, key: int, ptype: int) -> None:
        m = self.model
        if not self.registered_with(n, key):
            expected: object = CONFLICT
        elif m.type is None:
            m.holder, m.type = n, ptype
            expected = GOOD
        else:
            expected = GOOD if m.is_holder(n) and m.type == ptype else CONFLICT
        assert self.send(n, *prout(1, ptype, key, 0)) == expected

    @rule(n=st.integers(0, 2), key=KEYS, ptype=TYPES)
    def release(self, n: int, key: int, ptype: int) -> None:
        m = self.model
        if not self.registered_with(n, key):
            expected: object = CONFLICT
        elif m.type is None or not m.is_holder(n):
            expected = GOOD
        elif m.type != ptype:
            expected = INVALID_RELEASE
        else:
            m.holder = m.type = None
            expected = GOOD
        assert self.send(n, *prout(2, ptype, key, 0)) == expected

    @rule(n=st.integers(0, 2), key=KEYS)
    def clear(self, n: int, key: int) -> None:
        m = self.model
        if not self.registered_with(n, key):
            expected: object = CONFLICT
        else:
            m.regs.clear()
            m.holder = m.type = None
            m.generation += 1
            expected = GOOD
        assert self.send(n, *prout(3, 0, key, 0)) == expected

    @rule(n=st.integers(0, 2), key=KEYS, sa_key=KEYS, ptype=TYPES, abort=st.booleans())
    def preempt(self, n: int, key: int, sa_key: int, ptype: int, abort: bool) -> None:
        m = self.model
        expected: object = GOOD
        if not self.registered_with(n, key):
            expected = CONFLICT
        elif m.type in AR and sa_key == 0:
            m.regs = {n: m.regs[n]}
            m.holder, m.type = n, ptype
            m.generation += 1
        elif m.type is not None and m.type not in AR and m.regs[m.holder] == sa_key:  # type: ignore[index]
            m.regs = {i: k for i, k in m.regs.items() if k != sa_key or i == n}
            m.holder, m.type = n, ptype
            m.generation += 1
        elif sa_key == 0:
            expected = INVALID_PARAM
        else:
            matched = {i for i, k in m.regs.items() if k == sa_key}
            if not matched:
                expected = CONFLICT
            else:
                for i in matched - {n}:
                    m.unregister(i)
                m.generation += 1
        assert self.send(n, *prout(5 if abort else 4, ptype, key, sa_key)) == expected

    @rule(n=st.integers(0, 2))
    def access(self, n: int) -> None:
        write = self.send(n, [0x2A, 0, 0, 0, 0, 1, 0, 0, 1, 0], bytes(512))
        read = self.send(n, [0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0])
        assert write == (GOOD if self.model.may_write(n) else CONFLICT)
        assert read == (GOOD if self.model.may_read(n) else CONFLICT)

    @invariant()
    def reports_agree(self) -> None:
        m = self.model
        r = self.reply(0, [0x5E, 0, 0, 0, 0, 0, 0, 0x10, 0, 0])
        assert r.status == Status.GOOD, r.result
        data = r.data
        assert int.from_bytes(data[0:4], "big") == m.generation
        keys = sorted(int.from_bytes(data[i : i + 8], "big") for i in range(8, len(data), 8))
        assert keys == sorted(m.regs.values())
        r = self.reply(0, [0x5E, 1, 0, 0, 0, 0, 0, 0x10, 0, 0])
        data = r.data
        if m.type is None:
            assert int.from_bytes(data[4:8], "big") == 0
        else:
            assert int.from_bytes(data[4:8], "big") == 16
            assert data[21] & 0x0F == m.type
            key = 0 if m.type in AR else m.regs[m.holder]  # type: ignore[index]
            assert int.from_bytes(data[8:16], "big") == key


TestPersistentReservations = PrMachine.TestCase
TestPersistentReservations.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None
)
