"""Table-driven: CDB (+ data-out) -> status, sense key/ASC/ASCQ, field pointer, data."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field

import pytest

from lunastor.iscsi.scsi.sense import FieldPointer
from lunastor.iscsi.scsi.types import Status
from tests.unit.scsi.harness import Rig

GOOD = Status.GOOD
CC = Status.CHECK_CONDITION
NUM_BLOCKS = 4096  # harness default
BS = 512

INVALID_OPCODE = (5, 0x20, 0x00)
INVALID_CDB = (5, 0x24, 0x00)
INVALID_PARAM = (5, 0x26, 0x00)
PARAM_LENGTH = (5, 0x1A, 0x00)
LBA_OOR = (5, 0x21, 0x00)
SAVING = (5, 0x39, 0x00)
WRITE_PROTECTED = (7, 0x27, 0x00)
MISCOMPARE = (0xE, 0x1D, 0x00)


def be(value: int, n: int) -> list[int]:
    return list(value.to_bytes(n, "big"))


def rw10(op: int, lba: int, blocks: int, flags: int = 0) -> list[int]:
    return [op, flags, *be(lba, 4), 0, *be(blocks, 2), 0]


def rw12(op: int, lba: int, blocks: int, flags: int = 0) -> list[int]:
    return [op, flags, *be(lba, 4), *be(blocks, 4), 0, 0]


def rw16(op: int, lba: int, blocks: int, flags: int = 0) -> list[int]:
    return [op, flags, *be(lba, 8), *be(blocks, 4), 0, 0]


def unmap_list(*ranges: tuple[int, int], data_len: int | None = None) -> bytes:
    descs = b"".join(lba.to_bytes(8, "big") + n.to_bytes(4, "big") + bytes(4) for lba, n in ranges)
    dl = len(descs) + 6 if data_len is None else data_len
    return dl.to_bytes(2, "big") + len(descs).to_bytes(2, "big") + bytes(4) + descs


@dataclass
class Case:
    name: str
    cdb: list[int]
    data_out: bytes = b""
    status: Status = GOOD
    ksa: tuple[int, int, int] | None = None
    field: FieldPointer | None = None
    data: bytes | None = None  # exact data-in, or
    data_prefix: bytes | None = None  # its beginning
    data_len: int | None = None
    rig: dict[str, object] = dc_field(default_factory=dict)


def cdb_field(byte: int, bit: int | None = None) -> FieldPointer:
    return FieldPointer(True, byte, bit)


def param_field(byte: int, bit: int | None = None) -> FieldPointer:
    return FieldPointer(False, byte, bit)


CASES = [
    # -- dispatch
    Case("unknown opcode", [0xFF, 0, 0, 0, 0, 0], status=CC, ksa=INVALID_OPCODE),
    Case(
        "unknown service action in 16",
        [0x9E, 0x1F] + [0] * 14,
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(1, 4),
    ),
    Case(
        "NACA bit in control byte",
        [0x00, 0, 0, 0, 0, 0x04],
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(5, 2),
    ),
    Case(
        "reserved bit in TEST UNIT READY",
        [0x00, 0x01, 0, 0, 0, 0],
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(1, 0),
    ),
    # -- INQUIRY
    Case(
        "standard inquiry",
        [0x12, 0, 0, 0, 96, 0],
        data_len=96,
        data_prefix=bytes([0x00, 0x00, 0x06, 0x12, 91, 0x10, 0x10, 0x02]) + b"LUNASTORVOLUME  ",
    ),
    Case("inquiry alloc 5", [0x12, 0, 0, 0, 5, 0], data=bytes([0, 0, 6, 0x12, 91])),
    Case(
        "inquiry page code without EVPD",
        [0x12, 0, 0x80, 0, 96, 0],
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(2),
    ),
    Case(
        "inquiry CMDDT",
        [0x12, 0x02, 0, 0, 96, 0],
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(1, 1),
    ),
    Case(
        "supported VPD pages",
        [0x12, 1, 0x00, 0, 255, 0],
        data=bytes([0, 0, 0, 6, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]),
    ),
    Case("unit serial number", [0x12, 1, 0x80, 0, 255, 0], data=b"\x00\x80\x00\x07VOL0001"),
    Case(
        "unsupported VPD page",
        [0x12, 1, 0x87, 0, 255, 0],
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(2),
    ),
    Case(
        "block limits",
        [0x12, 1, 0xB0, 0, 255, 0],
        data_len=64,
        data_prefix=bytes([0, 0xB0, 0, 0x3C, 0x01, 255, 0, 8]),
    ),
    Case(
        "block device characteristics",
        [0x12, 1, 0xB1, 0, 255, 0],
        data_len=64,
        data_prefix=bytes([0, 0xB1, 0, 0x3C, 0, 1]),
    ),
    Case(
        "logical block provisioning",
        [0x12, 1, 0xB2, 0, 255, 0],
        data=bytes([0, 0xB2, 0, 4, 0, 0xE4, 0x02, 0]),
    ),
    Case(
        "logical block provisioning, thick",
        [0x12, 1, 0xB2, 0, 255, 0],
        data=bytes([0, 0xB2, 0, 4, 0, 0, 0, 0]),
        rig={"thin": False},
    ),
    # -- REPORT LUNS
    Case(
        "report luns",
        [0xA0, 0, 0, 0, 0, 0, *be(256, 4), 0, 0],
        data=be(8, 4) and bytes(be(8, 4) + [0] * 4 + [0] * 8),
    ),
    Case("report luns select 1", [0xA0, 0, 1, 0, 0, 0, *be(256, 4), 0, 0], data=bytes(8)),
    Case(
        "report luns bad select",
        [0xA0, 0, 3, 0, 0, 0, *be(256, 4), 0, 0],
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(2),
    ),
    Case(
        "report luns alloc < 16",
        [0xA0, 0, 0, 0, 0, 0, *be(15, 4), 0, 0],
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(6),
    ),
    # -- REQUEST SENSE
    Case(
        "request sense, nothing pending",
        [0x03, 0, 0, 0, 252, 0],
        data_len=18,
        data_prefix=bytes([0x70, 0, 0]),
    ),
    Case(
        "request sense, descriptor",
        [0x03, 1, 0, 0, 252, 0],
        data=bytes([0x72, 0, 0, 0, 0, 0, 0, 0]),
    ),
    # -- READ CAPACITY
    Case("read capacity 10", [0x25] + [0] * 9, data=bytes(be(NUM_BLOCKS - 1, 4) + be(BS, 4))),
    Case(
        "read capacity 10 lba without pmi",
        [0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0],
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(2),
    ),
    Case(
        "read capacity 16",
        [0x9E, 0x10] + [0] * 8 + be(32, 4) + [0, 0],
        data_len=32,
        data_prefix=bytes(be(NUM_BLOCKS - 1, 8) + be(BS, 4) + [0, 0, 0xC0, 0]),
    ),
    Case(
        "read capacity 16 alloc 8",
        [0x9E, 0x10] + [0] * 8 + be(8, 4) + [0, 0],
        data=bytes(be(NUM_BLOCKS - 1, 8)),
    ),
    # -- READ
    Case("read10 one block", rw10(0x28, 0, 1), data=bytes(512)),
    Case("read10 zero blocks", rw10(0x28, 0, 0), data=b""),
    Case("read10 last block", rw10(0x28, NUM_BLOCKS - 1, 1), data=bytes(512)),
    Case("read10 beyond end", rw10(0x28, NUM_BLOCKS - 1, 2), status=CC, ksa=LBA_OOR),
    Case("read10 zero blocks beyond end", rw10(0x28, NUM_BLOCKS + 1, 0), status=CC, ksa=LBA_OOR),
    Case(
        "read10 rdprotect",
        rw10(0x28, 0, 1, 0x20),
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(1, 5),
    ),
    Case("read10 dpo fua fua_nv", rw10(0x28, 0, 1, 0x1A), data=bytes(512)),
    Case(
        "read10 too long",
        rw10(0x28, 0, 0xFFFF),
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(7),
        rig={"num_blocks": 1 << 17},
    ),
    Case("read6 length 0 is 256 blocks", [0x08, 0, 0, 0, 0, 0], data=bytes(256 * 512)),
    Case("read6 beyond end", [0x08, 0, 0x0F, 0xFF, 2, 0], status=CC, ksa=LBA_OOR),
    Case("read12", rw12(0xA8, 4, 2), data=bytes(1024)),
    Case(
        "read12 rdprotect",
        rw12(0xA8, 4, 2, 0xE0),
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(1, 7),
    ),
    Case("read16", rw16(0x88, 4, 2), data=bytes(1024)),
    Case("read16 huge lba", rw16(0x88, (1 << 64) - 1, 1), status=CC, ksa=LBA_OOR),
    # -- WRITE
    Case("write10", rw10(0x2A, 1, 1), b"x" * 512),
    Case(
        "write10 wrprotect",
        rw10(0x2A, 1, 1, 0x40),
        b"x" * 512,
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(1, 6),
    ),
    Case("write10 beyond end", rw10(0x2A, NUM_BLOCKS, 1), b"x" * 512, status=CC, ksa=LBA_OOR),
    Case(
        "write10 read-only",
        rw10(0x2A, 1, 1),
        b"x" * 512,
        status=CC,
        ksa=WRITE_PROTECTED,
        rig={"read_only": True},
    ),
    Case("write16 fua", rw16(0x8A, 1, 1, 0x08), b"x" * 512),
    Case("write12 short data-out writes what came", rw12(0xAA, 1, 2), b"x" * 512),
    Case("write and verify 10", rw10(0x2E, 1, 1, 0x02), b"x" * 512),
    Case(
        "write and verify 10 bytchk 11b",
        rw10(0x2E, 1, 1, 0x06),
        b"x" * 512,
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(1, 2),
    ),
    # -- VERIFY
    Case("verify10 no bytchk", rw10(0x2F, 0, 8)),
    Case("verify10 bytchk match", rw10(0x2F, 0, 1, 0x02), bytes(512)),
    Case(
        "verify10 bytchk miscompare",
        rw10(0x2F, 0, 2, 0x02),
        bytes(700) + b"\x01" + bytes(323),
        status=CC,
        ksa=MISCOMPARE,
    ),
    Case(
        "verify16 bytchk 10b reserved",
        rw16(0x8F, 0, 1, 0x04),
        bytes(512),
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(1, 2),
    ),
    Case("verify12 beyond end", rw12(0xAF, NUM_BLOCKS, 1), status=CC, ksa=LBA_OOR),
    # -- SYNCHRONIZE CACHE / PRE-FETCH
    Case("sync cache 10", [0x35] + [0] * 9),
    Case("sync cache 16 beyond end", rw16(0x91, NUM_BLOCKS, 1), status=CC, ksa=LBA_OOR),
    Case("prefetch 10", rw10(0x34, 0, 8)),
    # -- UNMAP
    Case("unmap", [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], unmap_list((0, 8))),
    Case("unmap empty list", [0x42] + [0] * 9),
    Case(
        "unmap anchor",
        [0x42, 1, 0, 0, 0, 0, 0, 0, 24, 0],
        unmap_list((0, 8)),
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(1, 0),
    ),
    Case(
        "unmap short parameter list",
        [0x42, 0, 0, 0, 0, 0, 0, 0, 4, 0],
        bytes(4),
        status=CC,
        ksa=PARAM_LENGTH,
    ),
    Case(
        "unmap beyond end",
        [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        unmap_list((NUM_BLOCKS, 1)),
        status=CC,
        ksa=LBA_OOR,
    ),
    Case(
        "unmap bad descriptor length",
        [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        unmap_list((0, 8))[:2] + b"\x00\x0f" + unmap_list((0, 8))[4:],
        status=CC,
        ksa=INVALID_PARAM,
        field=param_field(2),
    ),
    Case(
        "unmap on a thick device",
        [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        unmap_list((0, 8)),
        status=CC,
        ksa=INVALID_OPCODE,
        rig={"thin": False},
    ),
    Case(
        "unmap read-only",
        [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        unmap_list((0, 8)),
        status=CC,
        ksa=WRITE_PROTECTED,
        rig={"read_only": True},
    ),
    # -- WRITE SAME
    Case("write same 10", [0x41, 0, *be(0, 4), 0, *be(8, 2), 0], b"z" * 512),
    Case("write same 16 unmap", [0x93, 0x08, *be(0, 8), *be(8, 4), 0, 0], bytes(512)),
    Case("write same 16 ndob", [0x93, 0x09, *be(0, 8), *be(8, 4), 0, 0]),
    Case(
        "write same 10 anchor",
        [0x41, 0x10, *be(0, 4), 0, *be(8, 2), 0],
        b"z" * 512,
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(1, 4),
    ),
    Case(
        "write same 10 zero blocks (WSNZ)",
        [0x41, 0, *be(0, 4), 0, 0, 0, 0],
        b"z" * 512,
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(7),
    ),
    Case(
        "write same 16 beyond end",
        [0x93, 0, *be(NUM_BLOCKS - 1, 8), *be(2, 4), 0, 0],
        b"z" * 512,
        status=CC,
        ksa=LBA_OOR,
    ),
    Case(
        "write same 10 wrprotect",
        [0x41, 0x20, *be(0, 4), 0, *be(8, 2), 0],
        b"z" * 512,
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(1, 5),
    ),
    Case(
        "write same 10 zero blocks past the end is out of range",
        [0x41, 0, *be(NUM_BLOCKS + 1, 4), 0, 0, 0, 0],
        b"z" * 512,
        status=CC,
        ksa=LBA_OOR,
    ),
    Case(
        "write same 10 half a block of data",
        [0x41, 0x08, *be(0, 4), 0, *be(1, 2), 0],
        bytes(256),
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(7),
    ),
    Case(
        "write same 10 two blocks of data",
        [0x41, 0x08, *be(0, 4), 0, *be(1, 2), 0],
        bytes(1024),
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(7),
    ),
    Case(
        "unmap zero blocks at the end",
        [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        unmap_list((NUM_BLOCKS, 0)),
    ),
    Case("unmap without descriptors", [0x42, 0, 0, 0, 0, 0, 0, 0, 8, 0], unmap_list()),
    Case(
        "unmap 256 descriptors",
        [0x42, 0, 0, 0, 0, 0, 0, *be(8 + 256 * 16, 2), 0],
        unmap_list(*[(i, 1) for i in range(256)]),
    ),
    Case(
        "unmap 257 descriptors",
        [0x42, 0, 0, 0, 0, 0, 0, *be(8 + 257 * 16, 2), 0],
        unmap_list(*[(i, 1) for i in range(257)]),
        status=CC,
        ksa=INVALID_PARAM,
        field=param_field(2),
    ),
    # -- COMPARE AND WRITE
    Case("compare and write", [0x89, 0, *be(0, 8), 0, 0, 0, 1, 0, 0], bytes(512) + b"n" * 512),
    Case(
        "compare and write miscompare",
        [0x89, 0, *be(0, 8), 0, 0, 0, 1, 0, 0],
        bytes(5) + b"q" + bytes(506) + b"n" * 512,
        status=CC,
        ksa=MISCOMPARE,
    ),
    Case(
        "compare and write beyond end",
        [0x89, 0, *be(NUM_BLOCKS, 8), 0, 0, 0, 1, 0, 0],
        bytes(1024),
        status=CC,
        ksa=LBA_OOR,
    ),
    Case("compare and write zero blocks", [0x89, 0, *be(0, 8), 0, 0, 0, 0, 0, 0]),
    Case(
        "compare and write with too much data-out",
        [0x89, 0, *be(0, 8), 0, 0, 0, 1, 0, 0],
        bytes(2048),
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(13),
    ),
    Case(
        "compare and write with too little data-out",
        [0x89, 0, *be(0, 8), 0, 0, 0, 3, 0, 0],
        bytes(2048),
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(13),
    ),
    # -- GET LBA STATUS
    Case(
        "get lba status",
        [0x9E, 0x12, *be(0, 8), *be(24, 4), 0, 0],
        data=bytes(be(20, 4) + [0] * 4 + be(0, 8) + be(NUM_BLOCKS, 4) + [1, 0, 0, 0]),
    ),
    Case(
        "get lba status beyond end",
        [0x9E, 0x12, *be(NUM_BLOCKS, 8), *be(24, 4), 0, 0],
        status=CC,
        ksa=LBA_OOR,
    ),
    # -- MODE SENSE / SELECT
    Case(
        "mode sense 6 caching",
        [0x1A, 0x08, 0x08, 0, 255, 0],
        data=bytes([23, 0, 0x10, 0, 0x08, 18, 0x04]) + bytes(17),
    ),
    Case(
        "mode sense 6 read-only sets WP",
        [0x1A, 0x08, 0x08, 0, 4, 0],
        data=bytes([23, 0, 0x90, 0]),
        rig={"read_only": True},
    ),
    Case("mode sense 6 saved values", [0x1A, 0, 0xC8, 0, 255, 0], status=CC, ksa=SAVING),
    Case(
        "mode sense 6 unknown page",
        [0x1A, 0, 0x05, 0, 255, 0],
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(2, 5),
    ),
    Case(
        "mode sense 10 llbaa",
        [0x5A, 0x10, 0x0A, 0, 0, 0, 0, 0, 255, 0],
        data_prefix=bytes([0, 6 + 16 + 12, 0, 0x10, 1, 0, 0, 16]) + bytes(be(NUM_BLOCKS, 8)),
    ),
    Case(
        "mode sense 6 all pages changeable",
        [0x1A, 0x08, 0x7F, 0, 255, 0],
        data_prefix=bytes([3 + 12 + 20 + 12 + 12, 0, 0x10, 0]),
    ),
    Case(
        "mode select 6 sp",
        [0x15, 0x11, 0, 0, 0, 0],
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(1, 0),
    ),
    Case(
        "mode select 6 clears WCE",
        [0x15, 0x10, 0, 0, 24, 0],
        bytes([0, 0, 0, 0, 0x08, 18]) + bytes(18),
    ),
    Case(
        "mode select 6 unchangeable bit",
        [0x15, 0x10, 0, 0, 24, 0],
        bytes([0, 0, 0, 0, 0x08, 18, 0x05]) + bytes(17),
        status=CC,
        ksa=INVALID_PARAM,
        field=param_field(6, 0),
    ),
    Case(
        "mode select 6 bad page length",
        [0x15, 0x10, 0, 0, 24, 0],
        bytes([0, 0, 0, 0, 0x08, 17]) + bytes(18),
        status=CC,
        ksa=INVALID_PARAM,
        field=param_field(5),
    ),
    # -- REPORT SUPPORTED OPERATION CODES / TMFs / TPGs
    Case(
        "report one opcode",
        [0xA3, 0x0C, 0x01, 0x28, 0, 0, *be(64, 4), 0, 0],
        data=bytes([0, 0x03, 0, 10, 0x28, 0x1E, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]),
    ),
    Case(
        "report one opcode with SA via option 1",
        [0xA3, 0x0C, 0x01, 0x9E, 0, 0, *be(64, 4), 0, 0],
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(2, 2),
    ),
    Case(
        "report opcode+SA",
        [0xA3, 0x0C, 0x02, 0x9E, 0, 0x10, *be(64, 4), 0, 0],
        data_prefix=bytes([0, 0x03, 0, 16, 0x9E, 0x10]),
    ),
    Case(
        "report unsupported opcode",
        [0xA3, 0x0C, 0x01, 0xFF, 0, 0, *be(64, 4), 0, 0],
        data=bytes([0, 0x01, 0, 0]),
    ),
    Case("report tmfs", [0xA3, 0x0D, 0, 0, 0, 0, *be(4, 4), 0, 0], data=bytes([0xDA, 0, 0, 0])),
    Case(
        "report target port groups",
        [0xA3, 0x0A, 0, 0, 0, 0, *be(64, 4), 0, 0],
        data=bytes([*be(12, 4), 128, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]),
    ),
    Case("read defect data 10", [0x37, 0, 0x18, 0, 0, 0, 0, 0, 32, 0], data=bytes([0, 0x18, 0, 0])),
    Case(
        "read defect data 12",
        [0xB7, 0x0D, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        data=bytes([0, 0x0D, 0, 0, 0, 0, 0, 0]),
    ),
    # -- removable
    Case(
        "start stop eject non-removable",
        [0x1B, 0, 0, 0, 0x02, 0],
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(4, 1),
    ),
    Case(
        "prevent allow changer bits",
        [0x1E, 0, 0, 0, 0x02, 0],
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(4, 1),
    ),
    Case("start stop with any power condition is a no-op", [0x1B, 1, 0, 0, 0xF2, 0]),
    Case("sync cache 10 with SYNC_NV and IMMED", [0x35, 0x06] + [0] * 8),
    # -- PR parameter lists
    Case(
        "prout register bad length",
        [0x5F, 0, 0, 0, 0, 0, 0, 0, 20, 0],
        bytes(20),
        status=CC,
        ksa=PARAM_LENGTH,
    ),
    Case(
        "prout spec_i_pt",
        [0x5F, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        bytes(8) + (1).to_bytes(8, "big") + bytes(4) + b"\x08\x00\x00\x00",
        status=CC,
        ksa=INVALID_PARAM,
        field=param_field(20, 3),
    ),
    Case(
        "prout aptpl on a volatile store",
        [0x5F, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        bytes(8) + (1).to_bytes(8, "big") + bytes(4) + b"\x01\x00\x00\x00",
        status=CC,
        ksa=INVALID_PARAM,
        field=param_field(20, 0),
    ),
    Case(
        "prout reserve bad type",
        [0x5F, 1, 0x02, 0, 0, 0, 0, 0, 24, 0],
        bytes(24),
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(2, 3),
    ),
    Case(
        "prin bad service action",
        [0x5E, 4, 0, 0, 0, 0, 0, 1, 0, 0],
        status=CC,
        ksa=INVALID_CDB,
        field=cdb_field(1, 4),
    ),
    Case(
        "prin report capabilities",
        [0x5E, 2, 0, 0, 0, 0, 0, 0, 8, 0],
        data=bytes([0, 8, 0x04, 0x90, 0xEA, 0x01, 0, 0]),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_case(case: Case) -> None:
    rig = Rig(**case.rig)  # type: ignore[arg-type]
    await rig.ready()
    r = await rig.cmd(case.cdb, case.data_out)
    assert r.status == case.status, r.result
    if case.status == CC:
        assert r.ksa == case.ksa
        if case.field is not None:
            assert r.sense.field == case.field
    else:
        assert r.result.sense == b""
    if case.data is not None:
        assert r.data == case.data
    if case.data_prefix is not None:
        assert r.data.startswith(case.data_prefix), r.data[: len(case.data_prefix) + 8].hex()
    if case.data_len is not None:
        assert len(r.data) == case.data_len
