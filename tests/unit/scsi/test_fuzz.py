"""Properties: any CDB gives a well-formed result; reserved bits are always refused."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from lunastor.iscsi.scsi import commands
from lunastor.iscsi.scsi.sense import FieldPointer, parse_sense
from lunastor.iscsi.scsi.types import Status
from tests.unit.scsi.harness import A, B, Rig

SPECS = commands.all_specs()
KNOWN_OPCODES = sorted({s.opcode for s in SPECS})

cdbs = st.one_of(
    st.binary(min_size=1, max_size=16),
    st.tuples(st.sampled_from(KNOWN_OPCODES), st.binary(min_size=0, max_size=15)).map(
        lambda t: bytes([t[0]]) + t[1]
    ),
    # a valid command with a few random bytes: reaches deeper into the handlers
    st.tuples(
        st.sampled_from(SPECS), st.lists(st.tuples(st.integers(1, 15), st.integers(0, 255)))
    ).map(lambda t: _mutate(t[0], t[1])),
)


def _mutate(spec: commands.CommandSpec, changes: list[tuple[int, int]]) -> bytes:
    cdb = bytearray(spec.cdb_length)
    cdb[0] = spec.opcode
    if spec.service_action is not None:
        cdb[1] = spec.service_action
    for i, v in changes:
        if i < len(cdb):
            cdb[i] = v & spec.usage[i]
    return bytes(cdb)


async def _run(cdb: bytes, data: bytes, lun: int, second: bool) -> None:
    rig = Rig(num_blocks=256, luns=(0, 1))
    await rig.ready()
    r = await rig.cmd(cdb, data, lun=lun, nexus=B if second else A)
    res = r.result
    assert res.status in (Status.GOOD, Status.CHECK_CONDITION, Status.RESERVATION_CONFLICT)
    if res.status == Status.CHECK_CONDITION:
        sense = parse_sense(res.sense)
        assert 0 < sense.key <= 0xE
        assert sense.key != 4, "HARDWARE ERROR: a handler raised an unexpected exception"
    else:
        assert res.sense == b""
    if res.transfer_length is not None:
        assert res.transfer_length >= 0
    assert isinstance(res.data_in, bytes | bytearray | memoryview)


@settings(max_examples=400, deadline=None)
@given(cdbs, st.binary(max_size=2048), st.sampled_from([0, 1, 7]), st.booleans())
def test_any_cdb_gives_a_well_formed_result(
    cdb: bytes, data: bytes, lun: int, second: bool
) -> None:
    asyncio.run(_run(cdb, data, lun, second))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SPECS), st.data())
def test_bits_outside_the_usage_mask_are_invalid_field_in_cdb(
    spec: commands.CommandSpec, data: st.DataObject
) -> None:
    reserved = [
        (i, b)
        for i in range(1, spec.cdb_length)
        for b in range(8)
        if not spec.usage[i] >> b & 1 and not (i == 1 and spec.service_action is not None and b < 5)
    ]
    if not reserved:
        return
    byte, bit = data.draw(st.sampled_from(reserved))
    cdb = bytearray(spec.cdb_length)
    cdb[0] = spec.opcode
    if spec.service_action is not None:
        cdb[1] = spec.service_action
    cdb[byte] |= 1 << bit

    async def run() -> None:
        rig = Rig(num_blocks=256)
        await rig.ready()
        r = await rig.cmd(bytes(cdb))
        assert r.status == Status.CHECK_CONDITION
        assert r.ksa == (5, 0x24, 0)
        assert r.sense.field == FieldPointer(True, byte, bit)

    asyncio.run(run())
