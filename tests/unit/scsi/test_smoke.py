"""The first slice end to end: a new nexus, identity, capacity, read and write."""

from __future__ import annotations

from lunastor.iscsi.blockdev import BlockDevice
from lunastor.iscsi.scsi.types import Status
from tests.unit.scsi.harness import Rig


async def test_first_command_reports_power_on_then_good() -> None:
    rig = Rig()
    r = await rig.cmd([0, 0, 0, 0, 0, 0])
    assert r.status == Status.CHECK_CONDITION
    assert r.ksa == (6, 0x29, 0x00)
    assert (await rig.cmd([0, 0, 0, 0, 0, 0])).status == Status.GOOD


async def test_write_then_read_back() -> None:
    rig = Rig()
    assert isinstance(rig.dev, BlockDevice)
    await rig.ready()
    data = bytes(range(256)) * 4
    r = await rig.cmd([0x2A, 0, 0, 0, 0, 7, 0, 0, 2, 0], data)
    assert r.status == Status.GOOD and r.result.transfer_length == 1024
    r = await rig.cmd([0x28, 0, 0, 0, 0, 7, 0, 0, 2, 0])
    assert r.status == Status.GOOD and r.data == data
