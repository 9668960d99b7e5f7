"""A target over a memory device, and a way to send it CDBs."""

from __future__ import annotations

from dataclasses import dataclass

from lunastor.iscsi.memdev import MemoryBlockDevice
from lunastor.iscsi.scsi.sense import ParsedSense, parse_sense
from lunastor.iscsi.scsi.target import LogicalUnit, ScsiTarget
from lunastor.iscsi.scsi.types import Nexus, ScsiCommand, ScsiResult, Status

TARGET = "iqn.2026-01.io.lunastor:target1"
NAA = 0x6001405000000000_0000000000000001
A = Nexus("iqn.2026-01.io.test:a", 0x400001370000, TARGET)
B = Nexus("iqn.2026-01.io.test:b", 0x400001370001, TARGET)


@dataclass
class Reply:
    result: ScsiResult

    @property
    def status(self) -> Status:
        return self.result.status

    @property
    def data(self) -> bytes:
        return bytes(self.result.data_in)

    @property
    def sense(self) -> ParsedSense:
        return parse_sense(self.result.sense)

    @property
    def ksa(self) -> tuple[int, int, int]:
        s = self.sense
        return (s.key, s.asc, s.ascq)


class Rig:
    def __init__(
        self,
        num_blocks: int = 4096,
        *,
        read_only: bool = False,
        thin: bool = True,
        removable: bool = False,
        luns: tuple[int, ...] = (0,),
    ) -> None:
        self.dev = MemoryBlockDevice(num_blocks, read_only=read_only, thin=thin)
        self.lu = LogicalUnit(self.dev, naa_id=NAA, serial="VOL0001", removable=removable)
        self.target = ScsiTarget(TARGET, {lun: self.lu for lun in luns})
        self.tag = 0

    async def cmd(
        self,
        cdb: bytes | list[int],
        data_out: bytes = b"",
        *,
        nexus: Nexus = A,
        lun: int = 0,
        expected_length: int = 0,
    ) -> Reply:
        self.tag += 1
        command = ScsiCommand(
            nexus, lun, bytes(cdb), self.tag, expected_length=expected_length, data_out=data_out
        )
        return Reply(await self.target.execute(command))

    async def ready(self, nexus: Nexus = A, lun: int = 0) -> None:
        """Consume the unit attentions a new nexus starts with."""
        for _ in range(8):
            r = await self.cmd([0, 0, 0, 0, 0, 0], nexus=nexus, lun=lun)
            if r.status == Status.GOOD:
                return
        raise AssertionError("unit attentions never cleared")
