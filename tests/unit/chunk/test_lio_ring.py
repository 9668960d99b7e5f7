"""The TCMU ring codec on a bytearray: the kernel's side is `queue_entry` / `reap_responses`."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lunastor.chunk.access.lio.ring import (
    CAP_OOOC,
    CAP_READ_LEN,
    MIN_ENTRY_SIZE,
    TAIL_OFFSET,
    UFLAG_READ_LEN,
    CommandRing,
    Response,
    RingError,
    cdb_length,
    entry_size,
    format_mailbox,
    queue_entry,
    read_mailbox,
    reap_responses,
)

CMDR_OFF = 128
CMDR_SIZE = 4096
DATA_OFF = CMDR_OFF + CMDR_SIZE
REGION = DATA_OFF + 64 * 1024

READ10 = bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0])
WRITE16 = bytes([0x8A, 0]) + bytes(8) + (1).to_bytes(4, "big") + bytes(2)
TUR = bytes(6)


def region(flags: int = CAP_OOOC | CAP_READ_LEN) -> bytearray:
    buf = bytearray(REGION)
    format_mailbox(buf, CMDR_OFF, CMDR_SIZE, flags)
    return buf


@pytest.mark.parametrize(
    ("cdb", "length"),
    [
        (TUR, 6),
        (READ10, 10),
        (bytes([0xA0]) + bytes(11), 12),  # REPORT LUNS, group 5
        (WRITE16, 16),
        (bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18]) + bytes(0x18), 32),  # variable length
        (bytes([0xC0]) + bytes(9), 10),  # vendor-specific group 6
    ],
)
def test_cdb_length(cdb: bytes, length: int) -> None:
    assert cdb_length(cdb[0], cdb[7:8]) == length


@pytest.mark.parametrize(
    ("iovs", "cdb_len", "size"),
    [(0, 6, 120), (1, 10, 128), (4, 16, 128), (5, 16, 144), (8, 260, 440)],
)
def test_entry_size_is_at_least_the_response_form(iovs: int, cdb_len: int, size: int) -> None:
    assert entry_size(iovs, cdb_len) == size
    assert size >= MIN_ENTRY_SIZE and size % 8 == 0


def test_command_read_and_answered_with_data_in() -> None:
    buf = region()
    ring = CommandRing(buf)
    assert queue_entry(buf, 7, READ10, [(DATA_OFF, 512)])
    [cmd] = ring.poll()
    assert (cmd.cmd_id, cmd.cdb, cmd.iovecs, cmd.length) == (7, READ10, ((DATA_OFF, 512),), 512)
    assert ring.write_data(cmd, b"\xab" * 300) == 300
    ring.complete(7, Response(0, read_len=300))
    assert buf[DATA_OFF : DATA_OFF + 301] == b"\xab" * 300 + b"\x00"
    assert read_mailbox(buf).cmd_tail == read_mailbox(buf).cmd_head
    slot = CMDR_OFF + cmd.slot
    assert buf[slot + 7] == UFLAG_READ_LEN
    assert struct.unpack_from("<BxxxI", buf, slot + 8) == (0, 300)
    assert reap_responses(buf, 0) == (read_mailbox(buf).cmd_tail, [(7, 0)])


def test_data_out_gathered_over_iovecs_and_sense_written() -> None:
    buf = region()
    ring = CommandRing(buf)
    buf[DATA_OFF : DATA_OFF + 4] = b"abcd"
    buf[DATA_OFF + 1000 : DATA_OFF + 1004] = b"efgh"
    assert queue_entry(buf, 1, WRITE16, [(DATA_OFF, 4), (DATA_OFF + 1000, 4)])
    [cmd] = ring.poll()
    assert bytes(ring.read_data(cmd)) == b"abcdefgh"
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10]) + bytes(4) + bytes([0x24, 0]) + bytes(4)
    ring.complete(1, Response(2, sense))
    slot = CMDR_OFF + cmd.slot
    assert buf[slot + 8] == 2 and buf[slot + 7] == 0  # no READ_LEN for a write
    assert bytes(buf[slot + 16 : slot + 16 + len(sense)]) == sense
    assert not any(buf[slot + 16 + len(sense) : slot + 112])


def test_without_read_len_capability_the_flag_is_not_set() -> None:
    buf = region(flags=CAP_OOOC)
    ring = CommandRing(buf)
    queue_entry(buf, 3, READ10, [(DATA_OFF, 512)])
    ring.poll()
    ring.complete(3, Response(0, read_len=10))
    assert buf[CMDR_OFF + 7] == 0


def test_out_of_order_completion_reuses_slots_in_ring_order() -> None:
    buf = region()
    ring = CommandRing(buf)
    for cmd_id in (1, 2, 3):
        queue_entry(buf, cmd_id, TUR, [])
    cmds = ring.poll()
    assert [c.cmd_id for c in cmds] == [1, 2, 3]
    ring.complete(3, Response(0))
    assert ring.outstanding == 2
    last, done = reap_responses(buf, 0)
    assert done == [(3, 0)] and last == cmds[1].slot
    ring.complete(1, Response(0x18))
    ring.complete(2, Response(0))
    last, done = reap_responses(buf, last)
    assert done == [(1, 0x18), (2, 0)] and last == read_mailbox(buf).cmd_head


def test_pad_at_the_end_of_the_ring_is_skipped() -> None:
    buf = region()
    ring = CommandRing(buf)
    done = 0
    # walk the ring around a few times: PADs appear whenever an entry does not fit
    for cmd_id in range(100):
        assert queue_entry(buf, cmd_id, READ10, [(DATA_OFF, 512)])
        [cmd] = ring.poll()
        assert cmd.cmd_id == cmd_id
        ring.complete(cmd_id, Response(0))
        done, answered = reap_responses(buf, done)
        assert answered == [(cmd_id, 0)]
    assert 100 * entry_size(1, 10) > 2 * CMDR_SIZE


def test_handler_restart_starts_at_the_tail() -> None:
    buf = region()
    ring = CommandRing(buf)
    queue_entry(buf, 1, TUR, [])
    ring.poll()
    ring.complete(1, Response(0))
    queue_entry(buf, 2, TUR, [])
    again = CommandRing(buf)  # a new handler process: entry 1 is answered, 2 is not
    assert [c.cmd_id for c in again.poll()] == [2]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: struct.pack_into("<H", b, 0, 1), "mailbox version 1"),
        (lambda b: struct.pack_into("<H", b, 2, CAP_READ_LEN), "CAP_OOOC"),
        (lambda b: struct.pack_into("<I", b, 8, REGION), "beyond the shared region"),
        (lambda b: struct.pack_into("<I", b, 4, 0), "impossible"),
    ],
)
def test_bad_mailbox_is_refused(damage: object, message: str) -> None:
    buf = region()
    damage(buf)  # type: ignore[operator]
    with pytest.raises(RingError, match=message):
        CommandRing(buf)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: struct.pack_into("<I", b, CMDR_OFF, 4 | 1), "length 0"),
        (lambda b: struct.pack_into("<I", b, CMDR_OFF, 64 | 1), "command entry at 0 of 64"),
        (lambda b: struct.pack_into("<I", b, CMDR_OFF, 128 | 5), "unknown opcode 5"),
        (lambda b: struct.pack_into("<I", b, CMDR_OFF, 8192 | 1), "in a 4096-byte ring"),
        (lambda b: struct.pack_into("<I", b, CMDR_OFF + 8, 100), "do not fit"),
        (lambda b: struct.pack_into("<Q", b, CMDR_OFF + 48, REGION), "outside the shared"),
        (lambda b: struct.pack_into("<Q", b, CMDR_OFF + 24, REGION), "CDB offset"),
        (lambda b: struct.pack_into("<I", b, 12, 4093), "cmd_head 4093"),
    ],
)
def test_bad_entries_raise_ring_error(damage: object, message: str) -> None:
    buf = region()
    ring = CommandRing(buf)
    queue_entry(buf, 1, READ10, [(DATA_OFF, 512)])
    damage(buf)  # type: ignore[operator]
    with pytest.raises(RingError, match=message):
        ring.poll()


def test_completion_errors() -> None:
    buf = region()
    ring = CommandRing(buf)
    with pytest.raises(RingError, match="no command outstanding"):
        ring.complete(1, Response(0))
    queue_entry(buf, 1, TUR, [])
    ring.poll()
    with pytest.raises(RingError, match="bytes of sense"):
        ring.complete(1, Response(2, bytes(97)))
    with pytest.raises(RingError, match="not a u16"):
        ring.complete(1 << 16, Response(0))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),  # iovecs
            st.sampled_from([TUR, READ10, WRITE16]),
            st.integers(0, 4),  # commands completed before the next is queued
        ),
        min_size=1,
        max_size=60,
    ),
    st.randoms(use_true_random=False),
)
def test_every_command_is_answered_once_whatever_the_order(
    plan: list[tuple[int, bytes, int]], rnd: object
) -> None:
    """The kernel's view: each queued cmd_id comes back exactly once, with its status."""
    import random

    assert isinstance(rnd, random.Random)
    buf = region()
    ring = CommandRing(buf)
    pending: list[int] = []
    queued: list[int] = []
    answered: list[tuple[int, int]] = []
    reaped = 0

    def finish(n: int) -> None:
        nonlocal reaped
        for _ in range(min(n, len(pending))):
            cmd_id = pending.pop(rnd.randrange(len(pending)))
            ring.complete(cmd_id, Response(cmd_id % 3))
        reaped, got = reap_responses(buf, reaped)
        answered.extend(got)

    for cmd_id, (iovs, cdb, completions) in enumerate(plan):
        iovecs = [(DATA_OFF + 512 * i, 512) for i in range(iovs)]
        while not queue_entry(buf, cmd_id, cdb, iovecs):
            assert pending, "the ring is full with nothing outstanding"
            finish(len(pending))
        queued.append(cmd_id)
        cmds = ring.poll()
        assert [(c.cmd_id, c.cdb, list(c.iovecs)) for c in cmds] == [(cmd_id, cdb, iovecs)]
        pending.append(cmd_id)
        finish(completions)
    finish(len(pending))
    assert sorted(answered) == [(i, i % 3) for i in queued]
    assert ring.outstanding == 0
    tail = struct.unpack_from("<I", buf, TAIL_OFFSET)[0]
    assert tail == read_mailbox(buf).cmd_head == reaped


def test_abi_offsets_golden_entry() -> None:
    """An entry laid out by hand from target_core_user.h (not by queue_entry): the request
    struct inside the packed entry is naturally aligned, so cdb_off is at byte 24 and the
    iovecs start at 48; sizeof(struct tcmu_cmd_entry) is 112. (A first version read cdb_off at
    20 and met a real kernel's 0xF0 << 32.)"""
    buf = region()
    entry = CMDR_OFF
    struct.pack_into("<IHBB", buf, entry, 128 | 1, 0x1234, 0, 0)  # len 128, CMD
    struct.pack_into("<III", buf, entry + 8, 1, 0, 0)
    struct.pack_into("<Q", buf, entry + 24, entry + 112)  # cdb_off
    struct.pack_into("<QQ", buf, entry + 48, DATA_OFF, 4096)
    buf[entry + 112 : entry + 122] = READ10
    struct.pack_into("<I", buf, 12, 128)  # cmd_head
    [cmd] = CommandRing(buf).poll()
    assert (cmd.cmd_id, cmd.cdb, cmd.iovecs) == (0x1234, READ10, ((DATA_OFF, 4096),))
