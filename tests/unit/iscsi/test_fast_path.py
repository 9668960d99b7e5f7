"""The command fast path answers exactly as the full path does.

Two identical rigs (a logged-in `TargetConnection`, a `ScsiTarget` over a memory LU) get the
same stream of SCSI Command PDUs and the same events between them (capacity changes, another
initiator's reservation, LU resets, ACL changes, a stopped LU, write cache off, a device
that turns inline I/O off). One has the fast path on (`fast_lanes`, as the asyncio adapter
sets it), the other not; each PDU is fed and its answer collected before the next, as an
initiator waiting for its answers sees it. The bytes out and the device contents must be
the same, while the fast path must really answer most plain commands.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from crc32c import crc32c
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lunastor.iscsi import pdu as p
from lunastor.iscsi.connection import ExecuteCommand, TargetConnection, TaskManagement
from lunastor.iscsi.memdev import MemoryBlockDevice
from lunastor.iscsi.scsi.target import LogicalUnit, ScsiTarget
from lunastor.iscsi.scsi.types import Nexus, ScsiCommand, TmfFunction
from tests.unit.iscsi.test_connection import CMDSN, TARGET, logged_in

BLOCKS = 2048  # 1 MiB of 512-byte blocks
OTHER = Nexus("iqn.2024-01.test:other", 0x23D000000009, TARGET)


class Device(MemoryBlockDevice):
    """A memory device whose inline I/O can be switched off (as a QoS limiter does)."""

    inline = True

    @property
    def inline_ok(self) -> bool:  # type: ignore[override]
        return self.inline


@dataclass
class Rig:
    conn: TargetConnection
    target: ScsiTarget
    lu: LogicalUnit
    dev: Device
    visible: set[int]

    def feed(self, wire: bytes) -> bytes:
        """Feed bytes, run what the connection asks for inline (as the adapter's first step
        does), return every byte it answers."""
        self.conn.receive_data(wire)
        for ev in self.conn.events():
            if isinstance(ev, ExecuteCommand):
                coro = self.target.execute(ev.command)
                try:
                    coro.send(None)
                except StopIteration as done:
                    self.conn.command_done(ev.itt, done.value)
                else:  # pragma: no cover - memory devices never wait
                    raise AssertionError("a memory LU command waited")
            elif isinstance(ev, TaskManagement):
                response = ev.response
                if response is None:
                    response = self.target.task_management(ev.nexus, ev.function, ev.lun)
                self.conn.tmf_done(ev.itt, response)
        return b"".join(bytes(b) for b in self.conn.data_to_send())

    def other(self, cdb: bytes) -> None:
        """A command of another initiator (another session, same target)."""
        coro = self.target.execute(ScsiCommand(OTHER, 0, cdb.ljust(16, b"\0"), 1))
        with contextlib.suppress(StopIteration):
            coro.send(None)


def make_rig(fast: bool, keys: list[tuple[str, str]]) -> Rig:
    conn = logged_in(extra=keys)
    conn.pdus_to_send()
    dev = Device(BLOCKS)
    lu = LogicalUnit(dev, naa_id=0x6 << 124 | 7, serial="fast", max_transfer_blocks=96)
    visible = {0}
    target = ScsiTarget(TARGET, {0: lu}, visible_luns=lambda nexus: set(visible))
    if fast:
        conn.fast_lanes = target.fast_lane
    rig = Rig(conn, target, lu, dev, visible)
    rig.other(bytes(6))  # the other initiator's POWER ON unit attention, out of the way
    return rig


def cdb_rw(op: int, flags: int, lba: int, blocks: int, control: int) -> bytes:
    if op in (0x28, 0x2A):  # opcode, flags, LBA, group, length, control
        return bytes([op, flags, *lba.to_bytes(4, "big"), 0, *blocks.to_bytes(2, "big"), control])
    return bytes([op, flags, *lba.to_bytes(8, "big"), *blocks.to_bytes(4, "big"), 0, control])


commands = st.fixed_dictionaries(
    {
        "op": st.sampled_from([0x28, 0x88, 0x2A, 0x8A, 0x28, 0x2A, 0x00, 0x12, 0x08]),
        "lba": st.one_of(
            st.integers(0, BLOCKS - 1), st.sampled_from([0, BLOCKS - 8, BLOCKS, 1 << 31])
        ),
        "blocks": st.sampled_from([1, 8, 8, 16, 64, 96, 97, 0]),
        "flags": st.sampled_from([0, 0, 0, 0x08, 0x10, 0x02, 0x01, 0x20]),
        "control": st.sampled_from([0, 0, 0, 0, 0x04]),
        "edtl_delta": st.sampled_from([0, 0, 0, 0, -512, 512]),
        "immediate": st.sampled_from([False, False, False, True]),
        "attr": st.sampled_from([1, 1, 1, 0, 2, 4, 5]),
        "lun": st.sampled_from([0, 0, 0, 0, 0, 1]),
        "short_data": st.sampled_from([False] * 9 + [True]),
        "bits": st.sampled_from(["rw"] * 8 + ["none", "both"]),
        "plain": st.sampled_from([True, True, True, True, False]),
    }
)
PLAIN = {
    "flags": 0,
    "control": 0,
    "edtl_delta": 0,
    "attr": 1,
    "lun": 0,
    "short_data": False,
    "bits": "rw",
}
EVENTS = [
    "resize",
    "reserve_other",
    "release_other",
    "lun_reset",
    "hide_lun",
    "show_lun",
    "stop",
    "start",
    "wce_off",
    "wce_on",
    "inline_off",
    "inline_on",
    "restore",
]
# mostly nothing happens between two commands; "restore" undoes every lasting event
events = st.sampled_from(["none"] * 30 + EVENTS + ["restore"] * 3)
negotiations = st.sampled_from(
    [
        [],
        [("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")],
        [("MaxRecvDataSegmentLength", "65536"), ("MaxBurstLength", "262144")],
        [
            ("MaxBurstLength", "65536"),
            ("FirstBurstLength", "65536"),
            ("MaxRecvDataSegmentLength", "8192"),
        ],
        [("ImmediateData", "No"), ("InitialR2T", "Yes")],
    ]
)


def apply(rig: Rig, event: str) -> None:
    if event == "restore":
        for undo in ("release_other", "show_lun", "start", "wce_on", "inline_on"):
            apply(rig, undo)
    elif event == "resize":
        rig.dev.resize(rig.dev.num_blocks + 8)
    elif event == "reserve_other":
        rig.other(bytes([0x16, 0, 0, 0, 0, 0]))  # RESERVE(6)
    elif event == "release_other":
        rig.other(bytes([0x17, 0, 0, 0, 0, 0]))  # RELEASE(6)
    elif event == "lun_reset":
        rig.target.task_management(OTHER, TmfFunction.LOGICAL_UNIT_RESET, 0)
    elif event == "hide_lun":
        rig.visible.discard(0)
        rig.target.visibility_changed()
    elif event == "show_lun":
        rig.visible.add(0)
        rig.target.visibility_changed()
    elif event in ("stop", "start"):
        rig.lu.started = event == "start"
    elif event in ("wce_off", "wce_on"):
        rig.lu.write_cache = event == "wce_on"
    elif event in ("inline_off", "inline_on"):
        rig.dev.inline = event == "inline_on"


def encode(itt: int, cmdsn: int, c: dict[str, object], payload: bytes, first_burst: int) -> bytes:
    op = int(c["op"])  # type: ignore[call-overload]
    blocks = int(c["blocks"])  # type: ignore[call-overload]
    write = op in (0x2A, 0x8A, 0x0A)
    if op in (0x28, 0x88, 0x2A, 0x8A):
        cdb = cdb_rw(op, int(c["flags"]), int(c["lba"]) & 0xFFFFFFFF, blocks, int(c["control"]))  # type: ignore[call-overload]
        edtl = max(0, blocks * 512 + int(c["edtl_delta"]))  # type: ignore[call-overload]
    elif op == 0x12:
        cdb, edtl = bytes([0x12, 0, 0, 0, 96, 0]), 96
    elif op == 0x08:
        cdb, edtl = bytes([0x08, 0, 0, 1, 1, 0]), 512
    else:
        cdb, edtl = bytes(6), 0
    data = payload[: min(edtl, first_burst)] if write else b""
    if write and c["short_data"]:
        data = data[: len(data) // 2]
    bits = c["bits"]
    pdu = p.ScsiCommand(
        immediate=bool(c["immediate"]),
        final=True,
        read=(bits == "both") or (bits == "rw" and not write and edtl > 0),
        write=(bits == "both") or (bits == "rw" and write),
        attr=int(c["attr"]) & 7 if int(c["attr"]) <= 4 else 1,  # type: ignore[call-overload]
        lun=p.lun_field(int(c["lun"])),  # type: ignore[call-overload]
        itt=itt,
        expected_data_transfer_length=edtl,
        cmdsn=cmdsn,
        cdb=cdb.ljust(16, b"\0"),
        data=data,
    )
    wire = b"".join(bytes(b) for b in p.encode_pdu(pdu))
    if int(c["attr"]) > 4:  # type: ignore[call-overload]
        wire = wire[:1] + bytes([wire[1] | 5]) + wire[2:]  # a reserved task attribute
    return wire


def digest_wire(conn: TargetConnection, wire: bytes) -> bytes:
    """Add the digests the connection negotiated to one PDU encoded without them."""
    header, segment = wire[:48], wire[48:]
    if conn.reader.header_digest:
        header += crc32c(header).to_bytes(4, "little")
    if conn.reader.data_digest and segment:
        segment += crc32c(segment).to_bytes(4, "little")
    return header + segment


def exchange(rig: Rig, wire: bytes, payload: bytes) -> bytes:
    """Feed one command and answer every R2T it draws with Data-Out, as an initiator does;
    return every byte the target sent."""
    conn = rig.conn
    answers = out = rig.feed(wire)
    while out:
        reader = p.PduReader(
            max_recv_data_segment_length=1 << 24,
            header_digest=conn.header_digest,
            data_digest=conn.data_digest,
            sender="target",
        )
        reader.feed(out)
        out = b""
        for r2t in reader:
            if not isinstance(r2t, p.R2T):
                continue
            offset, end = r2t.buffer_offset, r2t.buffer_offset + r2t.desired_data_transfer_length
            data_sn = 0
            while offset < end:
                n = min(end - offset, conn.target_mrdsl)
                pdu = p.DataOut(
                    final=offset + n == end,
                    lun=r2t.lun,
                    itt=r2t.itt,
                    ttt=r2t.ttt,
                    data_sn=data_sn,
                    buffer_offset=offset,
                    data=payload[offset : offset + n],
                )
                wire = b"".join(bytes(b) for b in p.encode_pdu(pdu))
                out += rig.feed(digest_wire(conn, wire))
                offset += n
                data_sn += 1
        answers += out
    return answers


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keys=negotiations,
    stream=st.lists(st.tuples(events, commands), min_size=8, max_size=30),
    seed=st.integers(0, 2**32 - 1),
)
def test_fast_and_full_path_send_the_same_bytes(
    keys: list[tuple[str, str]], stream: list[tuple[str, dict[str, object]]], seed: int
) -> None:
    fast, full = make_rig(True, keys), make_rig(False, keys)
    payload = os.urandom(1 << 17)
    cmdsn = CMDSN
    for itt, (event, c) in enumerate(stream, start=1):
        if c["plain"]:  # most commands are what the fast path takes, but for the events
            c = {**c, **PLAIN, "op": c["op"] if c["op"] in (0x28, 0x88, 0x2A, 0x8A) else 0x28}
            if c["lba"] >= BLOCKS:  # type: ignore[operator]
                c["lba"] = 0
        apply(fast, event)
        apply(full, event)
        first_burst = full.conn.params.first_burst_length
        wire = digest_wire(full.conn, encode(itt, cmdsn, c, payload, first_burst))
        if not c["immediate"] and int(c["attr"]) <= 4:  # type: ignore[call-overload]
            cmdsn += 1  # (a PDU rejected as undecodable does not use up its CmdSN)
        assert exchange(fast, wire, payload) == exchange(full, wire, payload)
        assert fast.conn.phase is full.conn.phase
    assert fast.dev._chunks == full.dev._chunks
    assert full.conn.fast_commands == 0


def read10(lba: int, blocks: int) -> bytes:
    return cdb_rw(0x28, 0, lba, blocks, 0)


def test_plain_commands_take_the_fast_path_and_events_end_it() -> None:
    rig = make_rig(True, [])
    wire = [
        b"".join(
            bytes(b)
            for b in p.encode_pdu(
                p.ScsiCommand(
                    read=True,
                    itt=i,
                    cmdsn=CMDSN + i,
                    expected_data_transfer_length=4096,
                    cdb=read10(i, 8).ljust(16, b"\0"),
                )
            )
        )
        for i in range(8)
    ]
    rig.feed(wire[0])  # the first command reports POWER ON (full path)
    assert rig.conn.fast_commands == 0
    rig.feed(wire[1])
    assert rig.conn.fast_commands == 1
    rig.dev.resize(BLOCKS + 8)  # CAPACITY DATA HAS CHANGED: the full path reports it
    answer = rig.feed(wire[2])
    assert rig.conn.fast_commands == 1 and answer[0] == 0x21 and answer[3] == 0x02
    rig.feed(wire[3])
    assert rig.conn.fast_commands == 2
    rig.other(bytes(6))  # the other initiator's CAPACITY DATA HAS CHANGED
    rig.other(bytes([0x16, 0, 0, 0, 0, 0]))  # another initiator reserves the LU
    answer = rig.feed(wire[4])
    assert rig.conn.fast_commands == 2 and answer[3] == 0x18  # RESERVATION CONFLICT
    rig.other(bytes([0x17, 0, 0, 0, 0, 0]))
    rig.feed(wire[5])
    assert rig.conn.fast_commands == 3


def read_command(i: int) -> bytes:
    """READ(10) of 8 blocks at LBA i, task tag i, the session's i-th CmdSN."""
    return b"".join(
        bytes(b)
        for b in p.encode_pdu(
            p.ScsiCommand(
                read=True,
                itt=i,
                cmdsn=CMDSN + i,
                expected_data_transfer_length=4096,
                cdb=read10(i, 8).ljust(16, b"\0"),
            )
        )
    )


def test_a_device_swapped_under_an_open_lane_is_never_bypassed() -> None:
    """A QoS limit set online puts a limiter in front of the LU's device (the chunk server
    swaps `lu.device`): a lane built before must not keep reading the old device inline."""
    rig = make_rig(True, [])
    command = read_command
    rig.feed(command(0))  # POWER ON, full path
    rig.feed(command(1))
    assert rig.conn.fast_commands == 1
    limited = Device(BLOCKS)
    limited.inline = False  # as LimitedVolume: every command through the awaitable path
    rig.lu.device = limited
    rig.feed(command(2))
    rig.feed(command(3))
    assert rig.conn.fast_commands == 1, "the old device was read inline past its limiter"
    rig.lu.device = rig.dev  # the limit cleared: inline again, from the next lane on
    rig.feed(command(4))  # finds its lane stale: the full path, and a fresh lane after it
    rig.feed(command(5))
    assert rig.conn.fast_commands == 2


def test_a_stream_split_anywhere_is_answered_the_same() -> None:
    one, split = make_rig(True, []), make_rig(True, [])
    wire = [
        b"".join(
            bytes(b)
            for b in p.encode_pdu(
                p.ScsiCommand(
                    read=i % 2 == 0,
                    write=i % 2 == 1,
                    itt=i,
                    cmdsn=CMDSN + i,
                    expected_data_transfer_length=4096,
                    cdb=cdb_rw(0x28 if i % 2 == 0 else 0x2A, 0, i * 8, 8, 0).ljust(16, b"\0"),
                    data=bytes([i]) * 4096 if i % 2 else b"",
                )
            )
        )
        for i in range(1, 200)
    ]
    one.feed(b"".join(bytes(b) for b in p.encode_pdu(p.ScsiCommand(itt=0, cmdsn=CMDSN))))
    split.feed(b"".join(bytes(b) for b in p.encode_pdu(p.ScsiCommand(itt=0, cmdsn=CMDSN))))
    expected = b"".join(one.feed(w) for w in wire)
    blob = b"".join(wire)
    got = b""
    pos = 0
    for size in [1, 47, 48, 49, 4096, 4144, 7, 100000] * 100:
        if pos >= len(blob):
            break
        got += split.feed(blob[pos : pos + size])
        pos += size
    assert got == expected
    assert split.conn.fast_commands == one.conn.fast_commands == 199


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flips=st.lists(st.tuples(st.integers(0, 47), st.integers(0, 255)), min_size=1, max_size=6),
    write=st.booleans(),
)
def test_mangled_commands_never_raise_out_of_receive_data(
    flips: list[tuple[int, int]], write: bool
) -> None:
    """Whatever a command's header says, the fast path answers it, or leaves it to the full
    path, which answers or rejects it: receive_data never raises on peer input."""
    rig = make_rig(True, [])
    rig.feed(b"".join(bytes(b) for b in p.encode_pdu(p.ScsiCommand(itt=0, cmdsn=CMDSN))))
    data = bytes(4096) if write else b""
    pdu = p.ScsiCommand(
        read=not write,
        write=write,
        itt=1,
        cmdsn=CMDSN + 1,
        expected_data_transfer_length=4096,
        cdb=cdb_rw(0x2A if write else 0x28, 0, 8, 8, 0).ljust(16, b"\0"),
        data=data,
    )
    wire = bytearray(b"".join(bytes(b) for b in p.encode_pdu(pdu)))
    for at, value in flips:
        wire[at] = value
    rig.feed(bytes(wire))
    rig.feed(bytes(wire))


def test_a_device_without_inline_writes_is_not_offered_them() -> None:
    """A replicated volume reads inline but every write awaits its primary: its lane admits
    reads only, so a write does not first try (and fail) inline."""
    rig = make_rig(True, [])
    rig.dev.inline_writes = False  # type: ignore[attr-defined]
    rig.feed(read_command(0))  # the nexus's first command (POWER ON) sets up its LU state
    lane = rig.target.fast_lane(rig.conn.session.nexus, 0)  # type: ignore[union-attr]
    assert lane is not None
    assert lane.admit(0, 8, write=False) == 8 * 512
    assert lane.admit(0, 8, write=True) == 0
