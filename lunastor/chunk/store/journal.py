"""The data journal: one redo log per data directory and store process (docs/extent-format.md,
"Journal").

Every data mutation of a replica (the blocks a write stores with their checksums, an unmap's
block range) is applied to the extent files on the page cache, as before, and appended as a
self-checked record to this file, on the page cache too. A flush of any replica of the data
directory is then one fdatasync of this file (group commit: concurrent flushes share a
round), not of each replica's data file and sidecar. Large runs of blocks are the exception
(PLACED records): written in place only, their record holds just their checksums, and the
replica's next flush syncs its data file beside the journal. A checkpoint (in the background,
and when the file passes a size) fdatasyncs the extent files the records touched, then starts
the file over under a new epoch. At the store's start, before any replica of the directory is
opened, every valid record since the last checkpoint is replayed (the records are whole
blocks with their checksums, so replay is idempotent; each block is redone from the one
record that decides it, a PLACED record only where the data file holds its data), the files
are synced and the journal starts over; a torn or stale record ends the replay.

Why a replay can never undo a later change: every change of a replica's data or sidecar is
either journaled (write, unmap, copy, the read-modify-write of partial blocks) or happens
with no record of that replica left in the journal (a write that finds no journal space runs
after a checkpoint, a delete is journaled as a FORGET that hides every earlier record of the
replica, a rescan's re-hash happens after the replay at open, a failed write is never
acknowledged); see the docs for the full list.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from lunastor.chunk.store import checksums as cs
from lunastor.chunk.store.checksums import BLOCK_SIZE, CHECKSUM_SIZE
from lunastor.chunk.store.fsio import (
    NO_SPACE,
    current_boot_id,
    data_dir_io,
    fallocate,
    pread_exact,
    punch_hole,
    pwrite_all,
)
from lunastor.chunk.store.header import (
    MAX_VOLUME_ID,
    SLOT_SIZE,
    Header,
    HeaderFlags,
    SlotError,
    decode_file,
    encode_slot,
)

if TYPE_CHECKING:
    from lunastor.chunk.store.replica import Replica

log = logging.getLogger(__name__)

JOURNAL_DIR = "journal"
MAGIC = b"LUNAJNL\n"
RECORD_MAGIC = b"LJR1"
VERSION = 1
HEAD_SLOT = 512  # two slots, the newer epoch wins (a torn slot write loses only itself)
RECORDS_START = 4096  # records start on their own page, away from the header slots
# magic, version, reserved, epoch, xxh64 of the first 24 bytes
_HEAD = struct.Struct(">8sHxxxxxxQ8s")
# magic, total length, epoch, lsn, kind, flags, volume length, reserved, extent, generation,
# seq, offset, length, volume, xxh64 (of this header with the field zeroed, then the sums)
_REC = struct.Struct(">4sIQQBBHIQQQQQ64s8s")
_HASH_AT = _REC.size - 8
DEFAULT_CHECKPOINT_BYTES = 64 * 1024 * 1024
DEFAULT_CHECKPOINT_INTERVAL = 5.0  # seconds from the first record after a checkpoint
# Whole-block runs at least this long are written in place with a PLACED record (checksums,
# no data) instead of a WRITE record holding the data: the journal would double their bytes
# (docs/extent-format.md, "Journal", PLACED)
DEFAULT_PLACED_BYTES = 64 * 1024
_GROW = 4 * 1024 * 1024  # the file is extended (fallocate) this much ahead of the tail
_IOV_MAX = 512  # buffers per pwritev (Linux allows 1024)
_PAGE = 4096  # each append is padded with zeros to a multiple of this


class Kind(IntEnum):
    WRITE = 1  # whole blocks at `offset`: checksums, then data
    UNMAP = 2  # blocks [offset, offset + length) now unmapped
    SEQ = 3  # applied_seq moved with no data (an ordered no-op)
    GEN = 4  # set_generation: (generation, applied_seq) from here on
    FORGET = 5  # the replica was deleted: no earlier record of it may be replayed
    PLACED = 6  # whole blocks at `offset` written in place in the data file: checksums only


_SUMMED = (Kind.WRITE, Kind.PLACED)  # kinds whose header is followed by block checksums
_TOUCHES = (Kind.WRITE, Kind.PLACED, Kind.UNMAP)  # kinds that change blocks [offset, +length)


FINAL = 1  # flag: the last record of an ordered mutation (its seq is applied)


@dataclass(slots=True)
class Record:
    kind: Kind
    volume: str
    extent: int
    gen: int = 0
    seq: int = 0
    offset: int = 0
    length: int = 0
    flags: int = 0
    sums: bytes = b""
    data: bytes | bytearray | memoryview = b""


def encode_record(
    rec: Record, epoch: int, lsn: int
) -> tuple[bytes, bytes | bytearray | memoryview]:
    """(header + checksums, data). The header's hash covers the header and the checksums;
    the data is covered by the checksums, one per block (verified at replay)."""
    vol = rec.volume.encode()
    total = _REC.size + len(rec.sums) + len(rec.data)
    fields = (
        RECORD_MAGIC, total, epoch, lsn, int(rec.kind), rec.flags, len(vol), 0, rec.extent,
        rec.gen, rec.seq, rec.offset, rec.length, vol,
    )  # fmt: skip
    h = xxhash.xxh64()
    h.update(_REC.pack(*fields, bytes(8)))
    h.update(rec.sums)
    return _REC.pack(*fields, h.digest()) + rec.sums, rec.data


def _decode_head(raw: bytes) -> tuple[int, Record] | None:
    """(total length, record without payload) of a record header, or None if not one."""
    if len(raw) < _REC.size or raw[:4] != RECORD_MAGIC:
        return None
    (_m, total, _epoch, _lsn, kind, flags, vlen, _r, extent, gen, seq, offset, length, vol, _h) = (
        _REC.unpack_from(raw)
    )
    if not 0 < vlen <= MAX_VOLUME_ID or kind not in Kind._value2member_map_:
        return None
    try:
        volume = vol[:vlen].decode()
    except UnicodeDecodeError:
        return None
    rec = Record(Kind(kind), volume, extent, gen, seq, offset, length, flags)
    return total, rec


@dataclass(slots=True)
class ReplayReport:
    records: int = 0
    bytes: int = 0
    replicas: set[tuple[str, int]] = field(default_factory=set)
    # blocks of PLACED records that did not hold their data (never flushed: a power loss)
    unplaced: int = 0
    rehashed: int = 0  # of those, blocks re-hashed as they were (the same boot)
    stop: str = ""  # why the scan ended (end of the journal, or what was torn)


class Journal:
    """One journal file `<data_dir>/journal/<name>.jnl` (one per store process)."""

    def __init__(
        self,
        data_dir: str,
        name: str,
        *,
        checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
        checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
        placed_bytes: int = DEFAULT_PLACED_BYTES,
        boot_id: bytes | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.placed_bytes = placed_bytes
        self.boot_id = boot_id if boot_id is not None else current_boot_id()
        self.path = Path(data_dir) / JOURNAL_DIR / f"{name}.jnl"
        self.checkpoint_bytes = checkpoint_bytes
        self.checkpoint_interval = checkpoint_interval
        self._fd = -1
        self.epoch = 0
        self._slot = 0  # the header slot holding `epoch`
        self._lsn = 0  # records appended in this epoch
        self._tail = RECORDS_START
        self._allocated = 0  # bytes of the file known to be allocated (fallocate)
        self._keys: set[tuple[str, int]] = set()  # replicas with records in this epoch
        # each replica's (generation, seq) of its last FINAL or GEN record in this epoch: its
        # applied_seq, which its header holds only as of its last change of state or flush
        self._applied: dict[tuple[str, int], tuple[int, int]] = {}
        # open replicas whose extent files hold changes only the journal has made durable
        self._dirty: dict[tuple[str, int], Replica] = {}
        self._sync_lock = asyncio.Lock()
        self._rounds_started = 0
        self._rounds_done = 0
        self._checkpoint_lock = asyncio.Lock()
        self._ready: asyncio.Event | None = None  # cleared while a checkpoint runs
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self.superseded = False  # another store instance took the file over (tests)
        self.checkpoints = 0
        self.sync_rounds = 0
        self.last_replay = ReplayReport()

    # -- start-up ---------------------------------------------------------------------------

    def open(self) -> ReplayReport:
        """Open (or create) the file, replay it, sync what it touched and start it over.
        Synchronous: runs once per data directory before any of its replicas is opened."""
        with data_dir_io(self.data_dir):
            self.path.parent.mkdir(exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                report = self._replay()
                self._reset_sync()
            except BaseException:
                os.close(self._fd)
                self._fd = -1
                raise
        self.last_replay = report
        if report.records:
            log.info(
                "journal %s: replayed %d records (%d bytes) of %d replicas; %s",
                self.path, report.records, report.bytes, len(report.replicas), report.stop,
            )  # fmt: skip
        return report

    def _read_epoch(self) -> tuple[int, int] | None:
        """(epoch, slot) of the newest valid header slot, None if there is none."""
        raw = pread_exact(self._fd, 2 * HEAD_SLOT, 0)
        best: tuple[int, int] | None = None
        for slot in (0, 1):
            s = raw[slot * HEAD_SLOT : slot * HEAD_SLOT + _HEAD.size]
            magic, version, epoch, digest = _HEAD.unpack(s)
            if magic != MAGIC or version != VERSION or xxhash.xxh64_digest(s[:-8]) != digest:
                continue
            if best is None or epoch > best[0]:
                best = (epoch, slot)
        return best

    def _scan(self, epoch: int) -> tuple[list[tuple[Record, int]], str]:
        """Valid records of `epoch` in order, each with the file offset of its payload."""
        out: list[tuple[Record, int]] = []
        pos = RECORDS_START
        size = os.fstat(self._fd).st_size
        lsn = 0
        while True:
            raw = pread_exact(self._fd, _REC.size, pos) if pos + _REC.size <= size else b""
            got = _decode_head(raw)
            if got is None and pos % _PAGE and not any(raw[:4]):
                boundary = pos + (-pos % _PAGE)  # an append's padding, all zeros
                if boundary <= size and not any(pread_exact(self._fd, boundary - pos, pos)):
                    pos = boundary
                    continue
            if got is None:
                return out, "end" if not any(raw) else f"no record at {pos}"
            total, rec = got
            parsed = _REC.unpack_from(raw)
            if parsed[2] != epoch or parsed[3] != lsn:
                return out, f"record of another epoch/position at {pos} (end)"
            nsums = 0
            if rec.kind in _SUMMED:
                if rec.offset % BLOCK_SIZE or rec.length % BLOCK_SIZE or rec.length <= 0:
                    return out, f"bad write record at {pos}"
                nsums = rec.length // BLOCK_SIZE * CHECKSUM_SIZE
            if total != _REC.size + nsums + (rec.length if rec.kind == Kind.WRITE else 0):
                return out, f"bad length at {pos}"
            if pos + total > size:
                return out, f"torn record at {pos} (past the end)"
            sums = pread_exact(self._fd, nsums, pos + _REC.size) if nsums else b""
            h = xxhash.xxh64()
            h.update(raw[:_HASH_AT] + bytes(8))
            h.update(sums)
            if h.digest() != raw[_HASH_AT : _REC.size]:
                return out, f"torn record at {pos} (header checksum)"
            if rec.kind in _SUMMED:
                if cs.count_mapped(sums) != len(sums) // CHECKSUM_SIZE:
                    return out, f"bad checksums at {pos}"
                if rec.kind == Kind.WRITE and cs.bad_blocks(
                    pread_exact(self._fd, rec.length, pos + _REC.size + nsums), sums, 0
                ):
                    return out, f"torn record at {pos} (data checksum)"
                rec.sums = sums
            out.append((rec, pos + _REC.size + nsums))
            pos += total
            lsn += 1

    def _replay(self) -> ReplayReport:
        report = ReplayReport()
        found = self._read_epoch()
        if found is None:
            self.epoch, self._slot = 0, 1  # a new file: the first header goes to slot 0
            report.stop = "new journal"
            return report
        self.epoch, self._slot = found
        records, report.stop = self._scan(self.epoch)
        # a FORGET hides every earlier record of its replica (deleted, maybe created again)
        start: dict[tuple[str, int], int] = {}
        for i, (rec, _) in enumerate(records):
            if rec.kind == Kind.FORGET:
                start[(rec.volume, rec.extent)] = i + 1
        files: dict[tuple[str, int], _ReplayTarget | None] = {}
        try:
            live: list[int] = []  # the records to redo, in order
            for i, (rec, _) in enumerate(records):
                key = (rec.volume, rec.extent)
                if i < start.get(key, 0) or rec.kind == Kind.FORGET:
                    continue
                if key not in files:
                    files[key] = _ReplayTarget.open(self.data_dir, *key, self.boot_id)
                if files[key] is not None:  # else no such replica here (any more)
                    live.append(i)
            # Which record decides each block (docs/extent-format.md, "Replay"): the last one
            # that changes it, unless that is a PLACED record whose block does not hold its
            # data; then, after a power loss, the one before it (that write was never
            # flushed), and in the same boot none: the crash cut that write short (its
            # record goes before its blocks), and the block is re-hashed as it is. Either
            # way that write's seq is not applied (`cut`).
            owner: dict[tuple[str, int, int], int] = {}
            cut: set[int] = set()
            for i in reversed(live):
                rec = records[i][0]
                if rec.kind not in _TOUCHES:
                    continue
                target = files[(rec.volume, rec.extent)]
                assert target is not None
                b0, n = rec.offset // BLOCK_SIZE, rec.length // BLOCK_SIZE
                todo = [b for b in range(b0, b0 + n) if (rec.volume, rec.extent, b) not in owner]
                if not todo:
                    continue
                good = set(range(b0, b0 + n))
                if rec.kind == Kind.PLACED:
                    good -= target.unplaced(rec)
                for b in todo:
                    final = b not in target.seen  # no later record changes the block
                    target.seen.add(b)
                    if b in good:
                        owner[(rec.volume, rec.extent, b)] = i
                    else:
                        report.unplaced += final
                        cut.add(i)
                        if target.same_boot:
                            owner[(rec.volume, rec.extent, b)] = -1
                            target.rehash.add(b)
            for i in live:
                rec, payload_at = records[i]
                key = (rec.volume, rec.extent)
                target = files[key]
                assert target is not None
                mine: list[bool] = []
                if rec.kind in _TOUCHES:
                    b0 = rec.offset // BLOCK_SIZE
                    mine = [
                        owner.get((rec.volume, rec.extent, b)) == i
                        for b in range(b0, b0 + rec.length // BLOCK_SIZE)
                    ]
                target.apply(rec, mine, self._fd, payload_at, i not in cut)
                report.records += 1
                report.bytes += rec.length if rec.kind == Kind.WRITE else 0
                report.replicas.add(key)
            for target in files.values():
                if target is not None:
                    report.rehashed += target.finish()
        finally:
            for target in files.values():
                if target is not None:
                    target.close()
        return report

    def _reset_sync(self) -> None:
        """Start over under the next epoch (every record so far is checkpointed)."""
        self._write_head(self.epoch + 1)
        os.fdatasync(self._fd)
        self._after_reset()

    def _write_head(self, epoch: int) -> None:
        slot = 1 - self._slot
        body = _HEAD.pack(MAGIC, VERSION, epoch, bytes(8))[:-8]
        pwrite_all(self._fd, body + xxhash.xxh64_digest(body), slot * HEAD_SLOT)
        self.epoch, self._slot = epoch, slot

    def _after_reset(self) -> None:
        self._lsn = 0
        self._tail = RECORDS_START
        self._keys.clear()
        self._applied.clear()  # every replica's header holds its applied_seq now
        self._allocated = max(self._allocated, os.fstat(self._fd).st_size)

    # -- appends ----------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    @property
    def tail(self) -> int:
        """The file offset where the next record goes."""
        return self._tail

    @property
    def busy(self) -> bool:
        """A checkpoint runs: appends must wait (`ready`)."""
        return self._ready is not None and not self._ready.is_set()

    async def ready(self) -> None:
        while self._ready is not None and not self._ready.is_set():
            await self._ready.wait()

    def has_records(self, volume: str, extent: int) -> bool:
        return (volume, extent) in self._keys

    def applied(self, h: Header) -> int:
        """The applied_seq of the replica whose header (read from its file) is `h`: the
        header's, or that of its records of this epoch, the same as a replay would find."""
        last = self._applied.get((h.volume, h.extent))
        if last is None or last[0] != h.generation:
            return h.applied_seq
        return max(h.applied_seq, last[1])

    def reserve(self, nbytes: int) -> bool:
        """Make room for `nbytes` of records at the tail; False when the file system is full
        (nothing changed). Other errors raise (the data directory is failing)."""
        end = self._tail + nbytes
        if end <= self._allocated:
            return True
        start = self._allocated
        new_end = end + _GROW
        with data_dir_io(self.data_dir):
            try:
                # Always with the margin: on a file system with less room than that, the
                # journal is not used (mutations go in place, Replica._journal_room) rather
                # than taking the last free blocks the extent files need.
                fallocate(self._fd, 0, start, new_end - start)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                    return True  # cannot preallocate: the append may still fail half-way
                if exc.errno in NO_SPACE:
                    return False
                raise
            # Zeros written over the new space: an append into written blocks is a plain
            # overwrite, so the fdatasync of a flush has no extent conversion (metadata) to
            # commit. (The file is reused from its start after each checkpoint.)
            zeros = bytes(min(new_end - start, _GROW))
            for off in range(start, new_end, len(zeros)):
                pwrite_all(self._fd, memoryview(zeros)[: min(len(zeros), new_end - off)], off)
            self._allocated = new_end
        return True

    @staticmethod
    def record_bytes(data_len: int, records: int = 1) -> int:
        """An upper bound of the journal bytes of `records` records holding `data_len` data
        bytes, each appended on its own (padded to a page)."""
        return data_len + data_len // BLOCK_SIZE * CHECKSUM_SIZE + records * (_REC.size + _PAGE)

    def append(self, records: Iterable[Record], replica: Replica | None) -> None:
        """Append records on the page cache (one pwritev). The caller reserved the space and
        is not inside a checkpoint (`busy` is False)."""
        assert not self.busy, "journal append during a checkpoint"
        bufs: list[bytes | bytearray | memoryview] = []
        for rec in records:
            head, data = encode_record(rec, self.epoch, self._lsn)
            self._lsn += 1
            bufs.append(head)
            if len(data):
                bufs.append(data)
            key = (rec.volume, rec.extent)
            self._keys.add(key)
            if rec.flags & FINAL or rec.kind == Kind.GEN:
                self._applied[key] = (rec.gen, rec.seq)
            elif rec.kind == Kind.FORGET:
                self._applied.pop(key, None)
        if not bufs:
            return
        total = sum(len(b) for b in bufs)
        # Zeros to the next page: the next append starts on a page of its own, so a page
        # a flush synced is never written again before a checkpoint (measured faster on this
        # VM's disk than records sharing pages, docs/datapath.md)
        pad = -(self._tail + total) % _PAGE
        if pad:
            bufs.append(bytes(pad))
            total += pad
        with data_dir_io(self.data_dir):
            pos = self._tail
            for i in range(0, len(bufs), _IOV_MAX):  # (a copy of many runs: many records)
                part = bufs[i : i + _IOV_MAX]
                size = sum(len(b) for b in part)
                n = os.pwritev(self._fd, part, pos)
                if n < size:  # a short write: the rest, from where it stopped
                    pwrite_all(self._fd, b"".join(bytes(b) for b in part)[n:], pos + n)
                pos += size
        self._tail += total
        self._allocated = max(self._allocated, self._tail)
        if replica is not None:
            self._dirty[(replica.volume, replica.extent)] = replica
        self._schedule()

    async def forget(self, volume: str, extent: int) -> None:
        """Before a replica's files are deleted: a durable FORGET record, so that no replay
        redoes its earlier records into the files of a replica created later by that name.
        With no journal space, a checkpoint does the same (no record of it is left)."""
        if not self.has_records(volume, extent) or self._fd < 0:
            return
        await self.ready()
        if self.has_records(volume, extent) and self.reserve(self.record_bytes(0)):
            self.append([Record(Kind.FORGET, volume, extent)], None)
            await self.sync()
        elif self.has_records(volume, extent):
            await self.checkpoint()

    def forget_replica(self, replica: Replica) -> None:
        """`replica` is closed with its files synced, or abandoned: no checkpoint for it."""
        key = (replica.volume, replica.extent)
        if self._dirty.get(key) is replica:
            del self._dirty[key]

    # -- flushes and checkpoints ------------------------------------------------------------

    async def sync(self) -> None:
        """Make every record appended before this call durable (group commit: a caller is
        served by any fdatasync round that started after its call)."""
        need = self._rounds_started + 1
        async with self._sync_lock:
            if self._rounds_done >= need:
                return
            self._rounds_started += 1
            self.sync_rounds += 1
            loop = asyncio.get_running_loop()
            with data_dir_io(self.data_dir):
                await loop.run_in_executor(None, os.fdatasync, self._fd)
            self._rounds_done = self._rounds_started

    def _schedule(self) -> None:
        if self._task is not None and not self._task.done():
            return
        loop = asyncio.get_running_loop()
        if self._tail - RECORDS_START >= self.checkpoint_bytes:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._task = loop.create_task(self._background())
        elif self._timer is None:
            self._timer = loop.call_later(self.checkpoint_interval, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._background())

    async def _background(self) -> None:
        try:
            await self.checkpoint()
        except Exception as exc:  # a failing data directory: its monitor retires it
            log.warning("journal %s: checkpoint failed: %s", self.path, exc)

    async def checkpoint(self) -> None:
        """Sync every replica the records touched (data, sidecar, then the header with
        `durable_seq`), then start the journal over. Appends wait meanwhile."""
        async with self._checkpoint_lock:
            if self._fd < 0 or self.superseded:
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._lsn == 0:
                return
            # First without stopping anyone: the bulk of the dirty pages goes to the disk
            # while appends go on; the stop below then syncs only what came meanwhile.
            done = await asyncio.gather(
                *(r.checkpoint_sync(header=False) for r in list(self._dirty.values())),
                return_exceptions=True,
            )
            for result in done:
                if isinstance(result, BaseException):
                    raise result
            self._ready = asyncio.Event()
            try:
                with data_dir_io(self.data_dir):
                    on_disk = self._read_epoch()
                if on_disk is None or on_disk[0] != self.epoch:
                    # another store instance of this process replayed and restarted the file
                    # (tests simulating a restart): it owns the file now
                    self.superseded = True
                    return
                replicas = list(self._dirty.values())
                done = await asyncio.gather(
                    *(r.checkpoint_sync() for r in replicas), return_exceptions=True
                )
                for result in done:
                    if isinstance(result, BaseException):
                        raise result
                loop = asyncio.get_running_loop()
                with data_dir_io(self.data_dir):
                    await loop.run_in_executor(None, self._reset_sync)
                for r in replicas:
                    self.forget_replica(r)
                self.checkpoints += 1
            finally:
                self._ready.set()
                self._ready = None

    async def close(self) -> None:
        """Checkpoint (the replicas are closed and synced by now) and close the file."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and not self._task.done():
            with contextlib.suppress(Exception):
                await self._task
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                await self.checkpoint()
            os.close(self._fd)
            self._fd = -1

    def abandon(self) -> None:
        """Close without a checkpoint (a data directory taken out of service)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        self.superseded = True


@dataclass(slots=True)
class _ReplayTarget:
    """One replica's files while records are redone into them."""

    header: Path
    fds: tuple[int, int, int]  # header, data, sums
    # its header says DIRTY in this boot: the process died, the page cache holds every write
    same_boot: bool
    last: tuple[int, int] | None = None  # (generation, seq) of the last applied mutation
    touched_data: bool = False
    seen: set[int] = field(default_factory=set)  # blocks a later record changes (replay)
    rehash: set[int] = field(default_factory=set)  # blocks of a write cut short (same boot)

    @classmethod
    def open(cls, data_dir: str, volume: str, extent: int, boot_id: bytes) -> _ReplayTarget | None:
        from lunastor.chunk.store.store import EXTENTS_DIR  # (store imports this module)

        base = Path(data_dir) / EXTENTS_DIR / volume / f"{extent:016x}"
        fds: list[int] = []
        try:
            for suffix in (".hdr", ".dat", ".sum"):
                fds.append(os.open(base.with_suffix(suffix), os.O_RDWR))
        except FileNotFoundError:
            for fd in fds:
                os.close(fd)
            return None
        try:
            h, _ = decode_file(pread_exact(fds[0], 2 * SLOT_SIZE, 0))
            same_boot = bool(h.flags & HeaderFlags.DIRTY) and h.boot_id == boot_id
        except SlotError:
            same_boot = False  # reported by the listing
        return cls(base.with_suffix(".hdr"), (fds[0], fds[1], fds[2]), same_boot)

    def unplaced(self, rec: Record) -> set[int]:
        """The blocks of a PLACED record that do not hold the data of its checksums."""
        b0 = rec.offset // BLOCK_SIZE
        data = pread_exact(self.fds[1], rec.length, rec.offset)
        return set(cs.bad_blocks(data, rec.sums, b0))

    def apply(
        self, rec: Record, mine: list[bool], journal_fd: int, payload_at: int, whole: bool
    ) -> None:
        """Redo `rec` on the blocks it decides (`mine`, one flag per block of its range);
        `whole`: its blocks hold its data (else its seq does not count)."""
        _, data_fd, sum_fd = self.fds
        b0 = rec.offset // BLOCK_SIZE
        for start, count, on in cs.runs(mine):
            if not on:
                continue
            lo, n = (b0 + start) * BLOCK_SIZE, count * BLOCK_SIZE
            sums = rec.sums[start * CHECKSUM_SIZE : (start + count) * CHECKSUM_SIZE]
            if rec.kind == Kind.WRITE:
                data = pread_exact(journal_fd, n, payload_at + start * BLOCK_SIZE)
                pwrite_all(data_fd, data, lo)
                pwrite_all(sum_fd, sums, (b0 + start) * CHECKSUM_SIZE)
            elif rec.kind == Kind.PLACED:  # the data is in place: only its checksums
                pwrite_all(sum_fd, sums, (b0 + start) * CHECKSUM_SIZE)
            elif rec.kind == Kind.UNMAP:
                pwrite_all(sum_fd, bytes(count * CHECKSUM_SIZE), (b0 + start) * CHECKSUM_SIZE)
                punch_hole(data_fd, lo, n)
            self.touched_data = True
        if rec.kind == Kind.GEN or (rec.flags & FINAL and whole):
            self.last = (rec.gen, rec.seq)

    def finish(self) -> int:
        """Re-hash the blocks of a write cut short, sync the redone data, then let the
        header's seqs cover the replayed mutations. Blocks re-hashed."""
        hdr_fd, data_fd, sum_fd = self.fds
        fixed = 0
        for b in sorted(self.rehash):
            sums = pread_exact(sum_fd, CHECKSUM_SIZE, b * CHECKSUM_SIZE)
            data = pread_exact(data_fd, BLOCK_SIZE, b * BLOCK_SIZE)
            if sums != cs.UNMAPPED and cs.bad_blocks(data, sums, b):
                pwrite_all(sum_fd, cs.block_checksum(data), b * CHECKSUM_SIZE)
                fixed += 1
                self.touched_data = True
        if self.touched_data:
            os.fdatasync(data_fd)
            os.fdatasync(sum_fd)
        if self.last is None:
            return fixed
        try:
            h, slot = decode_file(pread_exact(hdr_fd, 2 * SLOT_SIZE, 0))
        except SlotError:
            return fixed  # reported by the listing; nothing to correct
        gen, seq = self.last
        if gen != h.generation:
            return fixed  # adopted a newer generation since: its header (synced) rules
        applied, durable = max(h.applied_seq, seq), max(h.durable_seq, seq)
        if (applied, durable) == (h.applied_seq, h.durable_seq):
            return fixed
        new = h.evolve(applied_seq=applied, durable_seq=durable)
        pwrite_all(hdr_fd, encode_slot(new, counter=h.counter + 1), (1 - slot) * SLOT_SIZE)
        os.fdatasync(hdr_fd)
        return fixed

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


__all__ = [
    "DEFAULT_CHECKPOINT_BYTES",
    "DEFAULT_CHECKPOINT_INTERVAL",
    "DEFAULT_PLACED_BYTES",
    "FINAL",
    "Journal",
    "Kind",
    "Record",
    "ReplayReport",
]
