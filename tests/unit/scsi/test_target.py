"""Target-level behaviour: unit attentions, LUN masking, reservations, resets, mode state."""

from __future__ import annotations

import pytest

from lunastor.iscsi.blockdev import MediumError, NotReady
from lunastor.iscsi.memdev import MemoryBlockDevice
from lunastor.iscsi.scsi.sense import parse_sense
from lunastor.iscsi.scsi.target import LogicalUnit, ScsiTarget
from lunastor.iscsi.scsi.types import Nexus, ScsiCommand, Status, TmfFunction, TmfResponse
from tests.unit.scsi.harness import NAA, TARGET, A, B, Rig

TUR = [0, 0, 0, 0, 0, 0]
INQUIRY = [0x12, 0, 0, 0, 96, 0]
REPORT_LUNS = [0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
REQUEST_SENSE = [0x03, 0, 0, 0, 18, 0]
READ1 = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]
WRITE1 = [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]
BLOCK = b"\x5a" * 512
POWER_ON = (6, 0x29, 0x00)
CONFLICT = Status.RESERVATION_CONFLICT


def prout(
    sa: int, key: int, sa_key: int, ptype: int = 0, flags: int = 0
) -> tuple[list[int], bytes]:
    data = key.to_bytes(8, "big") + sa_key.to_bytes(8, "big") + bytes(4) + bytes([flags, 0, 0, 0])
    return [0x5F, sa, ptype, 0, 0, 0, 0, 0, 24, 0], data


# -- unit attentions ---------------------------------------------------------------------


async def test_inquiry_and_report_luns_neither_report_nor_clear_a_unit_attention() -> None:
    rig = Rig()
    assert (await rig.cmd(INQUIRY)).status == Status.GOOD
    assert (await rig.cmd(REPORT_LUNS)).status == Status.GOOD
    r = await rig.cmd(READ1)
    assert r.status == Status.CHECK_CONDITION and r.ksa == POWER_ON
    assert (await rig.cmd(READ1)).status == Status.GOOD


async def test_request_sense_returns_the_unit_attention_and_clears_it() -> None:
    rig = Rig()
    r = await rig.cmd(REQUEST_SENSE)
    assert r.status == Status.GOOD and (r.data[2], r.data[12], r.data[13]) == (6, 0x29, 0)
    r = await rig.cmd(REQUEST_SENSE)
    assert (r.data[2], r.data[12]) == (0, 0)
    assert (await rig.cmd(TUR)).status == Status.GOOD


async def test_capacity_change_is_reported_once_to_each_nexus() -> None:
    rig = Rig()
    await rig.ready(A)
    await rig.ready(B)
    rig.dev.resize(8192)
    for nexus in (A, B):
        r = await rig.cmd(TUR, nexus=nexus)
        assert r.ksa == (6, 0x2A, 0x09)
        assert (await rig.cmd(TUR, nexus=nexus)).status == Status.GOOD
    r = await rig.cmd([0x25] + [0] * 9)
    assert int.from_bytes(r.data[:4], "big") == 8191


async def test_mode_select_tells_the_other_nexuses() -> None:
    rig = Rig()
    await rig.ready(A)
    await rig.ready(B)
    page = bytes([0, 0, 0, 0, 0x08, 18]) + bytes(18)  # WCE off
    assert (await rig.cmd([0x15, 0x10, 0, 0, 24, 0], page)).status == Status.GOOD
    assert not rig.lu.write_cache
    assert (await rig.cmd(TUR, nexus=A)).status == Status.GOOD
    assert (await rig.cmd(TUR, nexus=B)).ksa == (6, 0x2A, 0x01)
    # with the write cache off every write reaches stable storage
    assert (await rig.cmd(WRITE1, BLOCK)).status == Status.GOOD
    assert rig.dev.fua_writes == 1


async def test_d_sense_switches_to_descriptor_sense() -> None:
    rig = Rig()
    await rig.ready()
    control = bytes([0, 0, 0, 0, 0x0A, 10, 0x24, 0x10, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0])
    assert (await rig.cmd([0x15, 0x10, 0, 0, 16, 0], control)).status == Status.GOOD
    r = await rig.cmd([0x28, 0, 0, 1, 0, 0, 0, 0, 1, 0])
    assert r.result.sense[0] == 0x72 and r.sense.descriptor and r.ksa == (5, 0x21, 0)


async def test_software_write_protect() -> None:
    rig = Rig()
    await rig.ready()
    control = bytes([0, 0, 0, 0, 0x0A, 10, 0x20, 0x10, 0x08, 0, 0, 0, 0xFF, 0xFF, 0, 0])
    assert (await rig.cmd([0x15, 0x10, 0, 0, 16, 0], control)).status == Status.GOOD
    assert (await rig.cmd(READ1)).status == Status.GOOD
    assert (await rig.cmd(WRITE1, BLOCK)).ksa == (7, 0x27, 0)
    r = await rig.cmd([0x1A, 0, 0x0A, 0, 255, 0])
    assert r.data[2] & 0x80  # WP in the device-specific parameter


async def test_sync_cache_flushes_the_device() -> None:
    rig = Rig()
    await rig.ready()
    assert (await rig.cmd([0x35] + [0] * 9)).status == Status.GOOD
    assert rig.dev.flushes == 1


# -- LUN masking and LUN map changes -----------------------------------------------------


def masked_target(visible: dict[Nexus, set[int]]) -> tuple[ScsiTarget, dict[int, LogicalUnit]]:
    luns = {
        n: LogicalUnit(MemoryBlockDevice(1024), naa_id=NAA + n, serial=f"V{n}") for n in (0, 1, 2)
    }
    target = ScsiTarget(TARGET, luns, visible_luns=lambda nexus: visible.get(nexus, set()))
    return target, luns


async def run(target: ScsiTarget, nexus: Nexus, lun: int, cdb: list[int], data: bytes = b""):  # type: ignore[no-untyped-def]
    return await target.execute(ScsiCommand(nexus, lun, bytes(cdb), 1, data_out=data))


async def test_masked_lun_zero_still_answers_inquiry_and_report_luns() -> None:
    visible = {A: {1}}
    target, _ = masked_target(visible)
    r = await run(target, A, 0, INQUIRY)
    assert r.status == Status.GOOD and r.data_in[0] == 0x7F  # PQ 011b, type 1Fh
    r = await run(target, A, 0, REPORT_LUNS)
    assert bytes(r.data_in) == bytes([0, 0, 0, 8, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0])
    r = await run(target, A, 0, READ1)
    assert r.status == Status.CHECK_CONDITION and r.sense[2] == 5 and r.sense[12] == 0x25
    r = await run(target, A, 2, INQUIRY)
    assert r.data_in[0] == 0x7F
    r = await run(target, A, 1, INQUIRY)
    assert r.data_in[0] == 0x00


async def test_lun_map_changes_raise_reported_luns_data_has_changed() -> None:
    visible = {A: {0, 1}, B: {0}}
    target, luns = masked_target(visible)
    for nexus in (A, B):
        await run(target, nexus, 0, TUR)  # POWER ON
        assert (await run(target, nexus, 0, TUR)).status == Status.GOOD
    target.remove_lun(1)  # only A could see it
    r = await run(target, A, 0, TUR)
    assert (r.sense[2], r.sense[12], r.sense[13]) == (6, 0x3F, 0x0E)
    assert (await run(target, B, 0, TUR)).status == Status.GOOD
    visible[B] = {0, 2}
    target.visibility_changed()
    r = await run(target, B, 0, TUR)
    assert (r.sense[2], r.sense[12], r.sense[13]) == (6, 0x3F, 0x0E)
    r = await run(target, B, 0, REPORT_LUNS)
    assert bytes(r.data_in)[8:] == bytes(8) + bytes([0, 2]) + bytes(6)
    target.add_lun(1, luns[1])
    assert (await run(target, A, 0, TUR)).sense[12] == 0x3F


# -- SPC-2 reservations, resets, nexus loss ----------------------------------------------


async def test_reserve6_between_two_initiators() -> None:
    rig = Rig()
    await rig.ready(A)
    await rig.ready(B)
    assert (await rig.cmd([0x16, 0, 0, 0, 0, 0], nexus=A)).status == Status.GOOD
    assert (await rig.cmd([0x16, 0, 0, 0, 0, 0], nexus=A)).status == Status.GOOD
    assert (await rig.cmd([0x16, 0, 0, 0, 0, 0], nexus=B)).status == CONFLICT
    assert (await rig.cmd([0x17, 0, 0, 0, 0, 0], nexus=B)).status == Status.GOOD  # no-op
    assert (await rig.cmd([0x1A, 0, 0x3F, 0, 255, 0], nexus=A)).status == Status.GOOD
    assert (await rig.cmd([0x1A, 0, 0x3F, 0, 255, 0], nexus=B)).status == CONFLICT
    assert (await rig.cmd(INQUIRY, nexus=B)).status == Status.GOOD
    assert (await rig.cmd([0x17, 0, 0, 0, 0, 0], nexus=A)).status == Status.GOOD
    assert (await rig.cmd([0x16, 0, 0, 0, 0, 0], nexus=B)).status == Status.GOOD


async def test_lun_reset_releases_reserve6_and_raises_a_unit_attention() -> None:
    rig = Rig()
    await rig.ready(A)
    await rig.ready(B)
    assert (await rig.cmd([0x16, 0, 0, 0, 0, 0], nexus=A)).status == Status.GOOD
    resp = rig.target.task_management(B, TmfFunction.LOGICAL_UNIT_RESET, 0)
    assert resp == TmfResponse.COMPLETE
    for nexus in (A, B):
        assert (await rig.cmd(TUR, nexus=nexus)).ksa == (6, 0x29, 0x03)
    assert (await rig.cmd([0x16, 0, 0, 0, 0, 0], nexus=B)).status == Status.GOOD
    assert rig.target.task_management(A, TmfFunction.LOGICAL_UNIT_RESET, 9) == (
        TmfResponse.LUN_DOES_NOT_EXIST
    )
    assert rig.target.task_management(A, TmfFunction.CLEAR_ACA, 0) == TmfResponse.NOT_SUPPORTED


async def test_nexus_loss_releases_reserve6_but_keeps_registrations() -> None:
    rig = Rig()
    await rig.ready(A)
    await rig.ready(B)
    assert (await rig.cmd([0x16, 0, 0, 0, 0, 0], nexus=A)).status == Status.GOOD
    rig.target.nexus_lost(A)
    assert (await rig.cmd([0x16, 0, 0, 0, 0, 0], nexus=B)).status == Status.GOOD
    assert (await rig.cmd([0x17, 0, 0, 0, 0, 0], nexus=B)).status == Status.GOOD
    assert (await rig.cmd(*prout(0, 0, 0xAA), nexus=B)).status == Status.GOOD
    rig.target.nexus_lost(B)
    await rig.ready(A)  # a new nexus starts with POWER ON
    r = await rig.cmd([0x5E, 0, 0, 0, 0, 0, 0, 1, 0, 0], nexus=A)
    assert r.data[8:16] == (0xAA).to_bytes(8, "big")


async def test_reserve6_conflicts_with_persistent_registrations() -> None:
    rig = Rig()
    await rig.ready(A)
    assert (await rig.cmd(*prout(0, 0, 1))).status == Status.GOOD
    assert (await rig.cmd([0x16, 0, 0, 0, 0, 0])).status == CONFLICT


# -- persistent reservation effects --------------------------------------------------------


async def test_preempt_and_abort_aborts_and_tells_the_preempted() -> None:
    aborted: list[tuple[Nexus, int]] = []
    rig = Rig()
    rig.target = ScsiTarget(
        TARGET, {0: rig.lu}, abort_tasks=lambda nexus, lun: aborted.append((nexus, lun))
    )
    await rig.ready(A)
    await rig.ready(B)
    assert (await rig.cmd(*prout(0, 0, 0xA), nexus=A)).status == Status.GOOD
    assert (await rig.cmd(*prout(0, 0, 0xB), nexus=B)).status == Status.GOOD
    assert (await rig.cmd(*prout(1, 0xB, 0, ptype=1), nexus=B)).status == Status.GOOD
    assert (await rig.cmd(WRITE1, BLOCK, nexus=A)).status == CONFLICT
    assert (await rig.cmd(READ1, nexus=A)).status == Status.GOOD  # write exclusive
    assert (await rig.cmd(*prout(5, 0xA, 0xB, ptype=3), nexus=A)).status == Status.GOOD
    assert aborted == [(B, 0)]
    assert (await rig.cmd(TUR, nexus=B)).ksa == (6, 0x2A, 0x05)
    assert (await rig.cmd(READ1, nexus=B)).status == CONFLICT  # exclusive access now
    assert (await rig.cmd(WRITE1, BLOCK, nexus=A)).status == Status.GOOD


async def test_release_of_registrants_only_tells_the_other_registrants() -> None:
    rig = Rig()
    await rig.ready(A)
    await rig.ready(B)
    await rig.cmd(*prout(0, 0, 0xA), nexus=A)
    await rig.cmd(*prout(0, 0, 0xB), nexus=B)
    assert (await rig.cmd(*prout(1, 0xA, 0, ptype=5), nexus=A)).status == Status.GOOD
    assert (await rig.cmd(WRITE1, BLOCK, nexus=B)).status == Status.GOOD  # a registrant
    r = await rig.cmd(*prout(2, 0xA, 0, ptype=1), nexus=A)
    assert r.ksa == (5, 0x26, 0x04)  # wrong type: INVALID RELEASE OF PERSISTENT RESERVATION
    assert (await rig.cmd(*prout(2, 0xA, 0, ptype=5), nexus=A)).status == Status.GOOD
    assert (await rig.cmd(TUR, nexus=B)).ksa == (6, 0x2A, 0x04)


async def test_register_and_move() -> None:
    rig = Rig()
    await rig.ready(A)
    await rig.ready(B)
    await rig.cmd(*prout(0, 0, 0xA), nexus=A)
    await rig.cmd(*prout(1, 0xA, 0, ptype=3), nexus=A)
    name = B.initiator_port.encode() + b"\x00"
    name = name.ljust((len(name) + 3) // 4 * 4, b"\x00")
    tid = bytes([0x45, 0]) + len(name).to_bytes(2, "big") + name
    params = (
        (0xA).to_bytes(8, "big")
        + (0xB).to_bytes(8, "big")
        + bytes([0, 0x02])  # UNREG
        + (1).to_bytes(2, "big")
        + len(tid).to_bytes(4, "big")
        + tid
    )
    cdb = [0x5F, 7, 3, 0, 0, *len(params).to_bytes(4, "big"), 0]
    assert (await rig.cmd(cdb, params, nexus=A)).status == Status.GOOD
    assert (await rig.cmd(WRITE1, BLOCK, nexus=B)).status == Status.GOOD
    assert (await rig.cmd(READ1, nexus=A)).status == CONFLICT
    r = await rig.cmd([0x5E, 3, 0, 0, 0, 0, 0, 1, 0, 0], nexus=B)  # READ FULL STATUS
    data = r.data
    assert int.from_bytes(data[4:8], "big") == 24 + len(tid)
    assert data[8:16] == (0xB).to_bytes(8, "big") and data[20] & 1 and data[21] == 3
    assert data[32:] == tid


# -- removable medium ------------------------------------------------------------------


async def test_removable_eject_prevent_and_load() -> None:
    rig = Rig(removable=True)
    await rig.ready(A)
    await rig.ready(B)
    assert (await rig.cmd([0x1E, 0, 0, 0, 1, 0], nexus=A)).status == Status.GOOD
    r = await rig.cmd([0x1B, 0, 0, 0, 0x02, 0], nexus=B)
    assert r.ksa == (5, 0x53, 0x02)
    rig.target.nexus_lost(A)  # prevention ends with the nexus that asked for it
    assert (await rig.cmd([0x1B, 0, 0, 0, 0x02, 0], nexus=B)).status == Status.GOOD
    assert (await rig.cmd(TUR, nexus=B)).ksa == (2, 0x3A, 0)
    assert (await rig.cmd(READ1, nexus=B)).ksa == (2, 0x3A, 0)
    assert (await rig.cmd([0x1B, 0, 0, 0, 0x03, 0], nexus=B)).status == Status.GOOD
    assert (await rig.cmd(TUR, nexus=B)).status == Status.GOOD


# -- device failures end to end ------------------------------------------------------------


class FailingDevice(MemoryBlockDevice):
    """A memory device whose reads fail with a chosen exception (fault injection)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(1024)
        self.error = error

    async def read(self, lba: int, blocks: int):  # type: ignore[no-untyped-def]
        raise self.error


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (MediumError(lba=3), (3, 0x11, 0x00, 3)),
        (NotReady(), (2, 0x04, 0x0A, None)),
        (RuntimeError("bug"), (4, 0x44, 0x00, None)),
    ],
    ids=["medium", "not-ready", "unexpected"],
)
async def test_device_failures_become_sense(
    error: Exception, expected: tuple[int, int, int, int | None]
) -> None:
    lu = LogicalUnit(FailingDevice(error), naa_id=NAA, serial="F1")
    target = ScsiTarget(TARGET, {0: lu})
    await run(target, A, 0, TUR)
    r = await run(target, A, 0, READ1)
    assert r.status == Status.CHECK_CONDITION
    s = parse_sense(r.sense)
    assert (s.key, s.asc, s.ascq, s.information) == expected


async def test_prevent_conflicts_under_a_reservation_but_allow_does_not() -> None:
    rig = Rig(removable=True)
    await rig.ready(A)
    await rig.ready(B)
    await rig.cmd(*prout(0, 0, 0xA), nexus=A)
    assert (await rig.cmd(*prout(1, 0xA, 0, ptype=1), nexus=A)).status == Status.GOOD
    assert (await rig.cmd([0x1E, 0, 0, 0, 1, 0], nexus=B)).status == CONFLICT
    assert (await rig.cmd([0x1E, 0, 0, 0, 0, 0], nexus=B)).status == Status.GOOD
    assert (await rig.cmd([0x1E, 0, 0, 0, 1, 0], nexus=A)).status == Status.GOOD
