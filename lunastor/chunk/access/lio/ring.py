"""The TCMU command ring, sans-IO: parse the kernel's command entries, write the responses.

target_core_user (TCMU) shares one memory region with its user-space handler through a uio
device (linux include/uapi/linux/target_core_user.h, ABI version 2). Its layout:

    offset 0   struct tcmu_mailbox (all little-endian)
                 u16 version (2), u16 flags (CAP_OOOC 1, CAP_READ_LEN 2, CAP_TMR 4, ...)
                 u32 cmdr_off    where the command ring starts
                 u32 cmdr_size   its length in bytes
                 u32 cmd_head    written by the kernel: end of the queued entries (ring offset)
      @64        u32 cmd_tail    written by us: end of the entries we have answered
    cmdr_off   the command ring: entries, each 8-byte aligned, never wrapping (the kernel pads)
    after it   the data area: the iovecs of each command point here

    entry header (8 bytes): u32 len_op (length | opcode in the low 3 bits: 0 PAD, 1 CMD,
                            2 TMR), u16 cmd_id, u8 kflags, u8 uflags (UNKNOWN_OP 1, READ_LEN 2)
    CMD request @8:  u32 iov_cnt, u32 iov_bidi_cnt, u32 iov_dif_cnt, 4 pad, @24 u64 cdb_off,
                     2 x u64 pad, @48 struct iovec[iov_cnt + iov_bidi_cnt + iov_dif_cnt]:
                     u64 base, u64 len (base and cdb_off: offsets from the region's start)
                     (the entry is __packed but its inner request struct is not: cdb_off is
                     8-byte aligned inside it)
    CMD response @8: u8 scsi_status, 3 pad, u32 read_len, @16 96 bytes of sense

A command entry is never shorter than 112 bytes (the size of the response form), so a response
always fits in any command entry. The kernel supports out-of-order completion (CAP_OOOC): it
reads the answered entries between its last position and our cmd_tail and finds each command
by the cmd_id written in the entry. So `CommandRing` answers each command in the oldest unused
command slot, whichever command finishes first, and moves cmd_tail past it.

Everything here works on any writable buffer: the mmap of the uio device in the daemon, a
bytearray in the tests.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from enum import IntEnum

MAILBOX_VERSION = 2
TAIL_OFFSET = 64  # cmd_tail sits on its own cache line
MAILBOX_SIZE = 68
ENTRY_ALIGN = 8  # TCMU_OP_ALIGN_SIZE
HEADER_SIZE = 8
REQUEST_SIZE = 48  # header + request fields, before the iovecs
IOVEC_SIZE = 16
RESPONSE_SIZE = 112  # header + status, padding, read_len, sense
MIN_ENTRY_SIZE = 112  # sizeof(struct tcmu_cmd_entry)
SENSE_SIZE = 96
MAX_CDB = 260  # SPC-4: a variable-length CDB is at most 260 bytes

CAP_OOOC = 1 << 0
CAP_READ_LEN = 1 << 1
CAP_TMR = 1 << 2
UFLAG_UNKNOWN_OP = 0x1
UFLAG_READ_LEN = 0x2

_MAILBOX = struct.Struct("<HHIII")
_U32 = struct.Struct("<I")
_HEADER = struct.Struct("<IHBB")
_REQUEST = struct.Struct("<IIIxxxxQ")  # iov_cnt, iov_bidi_cnt, iov_dif_cnt, cdb_off (at 8)
_IOVEC = struct.Struct("<QQ")
_RESPONSE = struct.Struct("<BxxxI")  # scsi_status, read_len (at 8)


# CDB length by group code (the opcode's top 3 bits), as the kernel's scsi_command_size
_GROUP_LENGTH = (6, 10, 10, 12, 16, 12, 10, 10)
VARIABLE_LENGTH = 0x7F


def cdb_length(opcode: int, byte7: bytes | memoryview) -> int:
    """How many bytes of CDB the kernel copied for this opcode (`byte7`: the CDB's byte 7,
    the additional length of a variable-length CDB, if there is one)."""
    if opcode == VARIABLE_LENGTH and len(byte7) == 1:
        return min(8 + byte7[0], MAX_CDB)
    return _GROUP_LENGTH[opcode >> 5]


class Opcode(IntEnum):
    PAD = 0
    CMD = 1
    TMR = 2


class RingError(Exception):
    """The shared region does not hold what the TCMU ABI says it must (a kernel mismatch, or a
    region that is not a TCMU mailbox)."""


@dataclass(frozen=True, slots=True)
class Mailbox:
    version: int
    flags: int
    cmdr_off: int
    cmdr_size: int
    cmd_head: int
    cmd_tail: int


def read_mailbox(buf: memoryview | bytearray) -> Mailbox:
    if len(buf) < MAILBOX_SIZE:
        raise RingError(f"region of {len(buf)} bytes is smaller than the mailbox")
    version, flags, off, size, head = _MAILBOX.unpack_from(buf, 0)
    (tail,) = _U32.unpack_from(buf, TAIL_OFFSET)
    return Mailbox(version, flags, off, size, head, tail)


@dataclass(frozen=True, slots=True)
class Command:
    """One SCSI command as the kernel queued it: its CDB and where its data lives."""

    cmd_id: int
    cdb: bytes
    iovecs: tuple[tuple[int, int], ...]  # (offset in the region, length): data-out or data-in
    slot: int  # ring offset of its entry

    @property
    def length(self) -> int:
        return sum(n for _, n in self.iovecs)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    sense: bytes = b""
    read_len: int | None = None  # bytes of data-in actually filled (a short read: underflow)


class CommandRing:
    """Our side of one TCMU command ring: `poll()` returns the new commands, `complete()`
    answers one (in any order) and moves cmd_tail.

    After `complete()` returns, the caller tells the kernel (a 4-byte write to the uio fd).
    """

    def __init__(self, buf: memoryview | bytearray) -> None:
        self.buf = memoryview(buf)
        mb = read_mailbox(self.buf)
        if mb.version != MAILBOX_VERSION:
            raise RingError(f"mailbox version {mb.version}, this handler speaks {MAILBOX_VERSION}")
        if not mb.flags & CAP_OOOC:
            raise RingError("the kernel does not allow out-of-order completion (CAP_OOOC)")
        if mb.cmdr_off < MAILBOX_SIZE or mb.cmdr_size <= 0:
            raise RingError(f"command ring at {mb.cmdr_off}, size {mb.cmdr_size}: impossible")
        if mb.cmdr_off + mb.cmdr_size > len(self.buf):
            raise RingError("the command ring extends beyond the shared region")
        self.cmdr_off = mb.cmdr_off
        self.size = mb.cmdr_size
        self.read_len_supported = bool(mb.flags & CAP_READ_LEN)
        # we read from cmd_tail: entries before it were answered by an earlier handler
        self.cursor = mb.cmd_tail
        self._slots: deque[int] = deque()  # command entries read and not yet reused

    @property
    def outstanding(self) -> int:
        """Commands handed out by `poll` and not yet completed."""
        return len(self._slots)

    def head(self) -> int:
        (head,) = _U32.unpack_from(self.buf, 12)
        return int(head)

    def poll(self) -> list[Command]:
        """Every command the kernel queued since the last poll, in ring order."""
        head = self.head()
        if head >= self.size or head % ENTRY_ALIGN:
            raise RingError(f"cmd_head {head} outside a ring of {self.size} bytes")
        commands = []
        while self.cursor != head:
            offset = self.cursor
            base = self.cmdr_off + offset
            len_op, cmd_id, _kflags, _uflags = _HEADER.unpack_from(self.buf, base)
            length = len_op & ~7
            if length < HEADER_SIZE or length % ENTRY_ALIGN or offset + length > self.size:
                raise RingError(f"entry at {offset}: length {length} in a {self.size}-byte ring")
            op = len_op & 7
            if op == Opcode.CMD:
                if length < MIN_ENTRY_SIZE:
                    raise RingError(f"command entry at {offset} of {length} bytes")
                commands.append(self._command(base, offset, length, cmd_id))
                self._slots.append(offset)
            elif op not in (Opcode.PAD, Opcode.TMR):
                raise RingError(f"entry at {offset}: unknown opcode {op}")
            # PAD and TMR entries need no answer (TMR: we did not ask for notifications)
            self.cursor = (offset + length) % self.size
        return commands

    def _command(self, base: int, offset: int, length: int, cmd_id: int) -> Command:
        count, bidi, dif, cdb_off = _REQUEST.unpack_from(self.buf, base + HEADER_SIZE)
        # bidirectional and protection-information iovecs follow the data ones; LIO sends them
        # only to handlers that claim support, so they are skipped, not used
        if REQUEST_SIZE + IOVEC_SIZE * (count + bidi + dif) > length:
            raise RingError(f"command {cmd_id}: its iovecs do not fit its {length}-byte entry")
        iovecs = []
        for i in range(count):
            iov_base, iov_len = _IOVEC.unpack_from(self.buf, base + REQUEST_SIZE + IOVEC_SIZE * i)
            if iov_base + iov_len > len(self.buf):
                raise RingError(f"command {cmd_id}: iovec {i} outside the shared region")
            iovecs.append((int(iov_base), int(iov_len)))
        if cdb_off >= len(self.buf):
            raise RingError(f"command {cmd_id}: CDB offset {cdb_off} outside the shared region")
        cdb_len = cdb_length(self.buf[cdb_off], self.buf[cdb_off + 7 : cdb_off + 8])
        if cdb_off + cdb_len > len(self.buf):
            raise RingError(f"command {cmd_id}: CDB runs past the shared region")
        return Command(cmd_id, bytes(self.buf[cdb_off : cdb_off + cdb_len]), tuple(iovecs), offset)

    def complete(self, cmd_id: int, response: Response) -> None:
        """Answer `cmd_id` in the oldest unused command slot and move cmd_tail past it."""
        if not self._slots:
            raise RingError(f"completing command {cmd_id} with no command outstanding")
        if not 0 <= cmd_id <= 0xFFFF:
            raise RingError(f"cmd_id {cmd_id} is not a u16")
        if len(response.sense) > SENSE_SIZE:
            raise RingError(f"{len(response.sense)} bytes of sense; the entry holds {SENSE_SIZE}")
        offset = self._slots.popleft()
        base = self.cmdr_off + offset
        len_op, _, kflags, _ = _HEADER.unpack_from(self.buf, base)
        uflags = 0
        read_len = 0
        if response.read_len is not None and self.read_len_supported:
            uflags |= UFLAG_READ_LEN
            read_len = response.read_len
        _HEADER.pack_into(self.buf, base, len_op, cmd_id, kflags, uflags)
        _RESPONSE.pack_into(self.buf, base + HEADER_SIZE, response.status, read_len)
        sense = base + 16
        self.buf[sense : sense + SENSE_SIZE] = response.sense.ljust(SENSE_SIZE, b"\x00")
        # with nothing outstanding every entry up to the cursor (PAD, TMR) is done too
        tail = self.cursor if not self._slots else (offset + (len_op & ~7)) % self.size
        _U32.pack_into(self.buf, TAIL_OFFSET, tail)

    def read_data(self, command: Command) -> memoryview | bytes:
        """The command's data-out (or, for a read, its yet-unfilled buffer): one view when it
        is a single iovec, a joined copy otherwise."""
        if len(command.iovecs) == 1:
            start, length = command.iovecs[0]
            return self.buf[start : start + length]
        return b"".join(bytes(self.buf[s : s + n]) for s, n in command.iovecs)

    def write_data(self, command: Command, data: bytes | bytearray | memoryview) -> int:
        """Scatter `data` (data-in) over the command's iovecs; returns the bytes written."""
        view = memoryview(data).cast("B")
        done = 0
        for start, length in command.iovecs:
            if done >= len(view):
                break
            n = min(length, len(view) - done)
            self.buf[start : start + n] = view[done : done + n]
            done += n
        return done


# -- the kernel's side, for tests and tools --------------------------------------------------


def format_mailbox(
    buf: memoryview | bytearray, cmdr_off: int, cmdr_size: int, flags: int = CAP_OOOC
) -> None:
    """Lay out an empty mailbox as tcmu_configure_device does."""
    _MAILBOX.pack_into(buf, 0, MAILBOX_VERSION, flags, cmdr_off, cmdr_size, 0)
    _U32.pack_into(buf, TAIL_OFFSET, 0)


def entry_size(iov_count: int, cdb_len: int) -> int:
    """The ring space a command takes: header, iovecs and CDB, 8-byte aligned, at least the
    size of the response form (what tcmu_cmd_get_cmd_size computes)."""
    base = max(REQUEST_SIZE + IOVEC_SIZE * iov_count, MIN_ENTRY_SIZE)
    return -(-(base + cdb_len) // ENTRY_ALIGN) * ENTRY_ALIGN


def queue_entry(
    buf: memoryview | bytearray,
    cmd_id: int,
    cdb: bytes,
    iovecs: list[tuple[int, int]],
) -> bool:
    """Queue one command as the kernel does (a PAD first when it would not fit before the
    ring's end); False when the ring has no room for it now."""
    mb = read_mailbox(buf)
    size = entry_size(len(iovecs), len(cdb))
    head, tail = mb.cmd_head, mb.cmd_tail
    used = (head - tail) % mb.cmdr_size
    pad = mb.cmdr_size - head if head + size > mb.cmdr_size else 0
    if used + pad + size >= mb.cmdr_size:  # a full ring would look empty (head == tail)
        return False
    if pad:
        _HEADER.pack_into(buf, mb.cmdr_off + head, pad | Opcode.PAD, 0, 0, 0)
        head = 0
    base = mb.cmdr_off + head
    cdb_at = base + max(REQUEST_SIZE + IOVEC_SIZE * len(iovecs), MIN_ENTRY_SIZE)
    _HEADER.pack_into(buf, base, size | Opcode.CMD, cmd_id, 0, 0)
    _REQUEST.pack_into(buf, base + HEADER_SIZE, len(iovecs), 0, 0, cdb_at)
    for i, (start, length) in enumerate(iovecs):
        _IOVEC.pack_into(buf, base + REQUEST_SIZE + IOVEC_SIZE * i, start, length)
    buf[cdb_at : cdb_at + len(cdb)] = cdb
    _U32.pack_into(buf, 12, (head + size) % mb.cmdr_size)
    return True


def reap_responses(buf: memoryview | bytearray, last: int) -> tuple[int, list[tuple[int, int]]]:
    """What the kernel does on a uio write: walk the entries from `last` to cmd_tail and
    collect (cmd_id, scsi_status) of each answered command; returns the new position."""
    mb = read_mailbox(buf)
    done = []
    while last != mb.cmd_tail:
        len_op, cmd_id, _, _ = _HEADER.unpack_from(buf, mb.cmdr_off + last)
        if len_op & 7 == Opcode.CMD:
            (status, _) = _RESPONSE.unpack_from(buf, mb.cmdr_off + last + HEADER_SIZE)
            done.append((cmd_id, status))
        last = (last + (len_op & ~7)) % mb.cmdr_size
    return last, done
