"""The extent store: replicas of extents on one or more local data directories.

Layout (docs/extent-format.md):
`<data_dir>/extents/<volume>/<extent as 16 hex digits>.{hdr,dat,sum}`.
A replica exists exactly when its `.hdr` exists: `create` writes the header last (to a
temporary name, then renamed), `delete` removes it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lunastor.chunk.store.checksums import BLOCK_SIZE, CHECKSUM_SIZE
from lunastor.chunk.store.errors import (
    DataDirFailed,
    HeaderDamaged,
    InvalidRequest,
    ReplicaExists,
    ReplicaNotFound,
    SpaceExhausted,
)
from lunastor.chunk.store.fsio import current_boot_id, data_dir_io, pread_exact
from lunastor.chunk.store.header import (
    FORMAT_VERSION,
    HEADER_FILE_SIZE,
    MAX_VOLUME_ID,
    SLOT_SIZE,
    Header,
    HeaderFlags,
    ReplicaState,
    SlotError,
    decode_file,
    encode_slot,
)
from lunastor.chunk.store.journal import (
    DEFAULT_CHECKPOINT_BYTES,
    DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_PLACED_BYTES,
    Journal,
)
from lunastor.chunk.store.replica import Replica, ReplicaInfo, ReplicaPaths

DEFAULT_EXTENT_SIZE = 64 * 1024 * 1024
EXTENTS_DIR = "extents"
_VOLUME_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_VOLUME_ID - 1}}}")
_HEADER_NAME = re.compile(r"([0-9a-f]{16})\.hdr")


@dataclass(frozen=True, slots=True)
class ReplicaProblem:
    """Something found at start-up that is not a usable replica: reported, never fatal."""

    path: str
    reason: str


@dataclass(slots=True)
class ReplicaListing:
    replicas: list[ReplicaInfo] = field(default_factory=list)
    problems: list[ReplicaProblem] = field(default_factory=list)
    failed_dirs: list[DataDirFailed] = field(default_factory=list)


class ExtentStore:
    """Replicas on local data directories. One instance per chunk server process."""

    def __init__(
        self,
        data_dirs: Sequence[str | os.PathLike[str]],
        extent_size: int = DEFAULT_EXTENT_SIZE,
        *,
        boot_id: bytes | None = None,  # tests pass one to simulate a reboot
        owns: Callable[[str, int], bool] | None = None,
        journal: str | None = "0",
        checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
        checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
        placed_bytes: int = DEFAULT_PLACED_BYTES,
    ) -> None:
        """`owns(volume, extent)`: the replicas this instance may touch (a chunk server's
        worker owns part of the extents, lunastor/chunk/workers.py); None: all of them.
        `journal`: the name of this process's journal in each data directory (a chunk
        server's worker index: one journal per process); None: no journal, every flush
        syncs the replica's data file and sidecar (the previous release's way). `placed_bytes`:
        whole-block runs this long or longer are written in place with a PLACED record
        (checksums only) rather than copied into the journal."""
        if not data_dirs:
            raise InvalidRequest("at least one data directory is required")
        if extent_size <= 0 or extent_size % BLOCK_SIZE:
            raise InvalidRequest(f"extent size must be a positive multiple of {BLOCK_SIZE}")
        self.data_dirs = [str(d) for d in data_dirs]
        self.extent_size = extent_size
        self.boot_id = boot_id if boot_id is not None else current_boot_id()
        self.failed: dict[str, DataDirFailed] = {}
        self.owns: Callable[[str, int], bool] = owns or (lambda volume, extent: True)
        self._open: dict[tuple[str, int], Replica] = {}
        self._index: dict[tuple[str, int], str] = {}  # (volume, extent) -> data dir
        self._opening: dict[tuple[str, int], asyncio.Lock] = {}
        # the file system each data dir was on when first seen: a change means unmounted
        self._devices: dict[str, int] = {}
        self.journal_name = journal
        self._checkpoint = (checkpoint_bytes, checkpoint_interval)
        self._placed_bytes = placed_bytes
        self.journals: dict[str, Journal] = {}  # data dir -> its journal, replayed at first use

    def journal(self, data_dir: str) -> Journal | None:
        """The data directory's journal: opened and replayed (redoing every record since
        its last checkpoint into the replicas' files) before the first replica of the
        directory is listed, created or opened."""
        if self.journal_name is None:
            return None
        j = self.journals.get(data_dir)
        if j is None:
            j = Journal(
                data_dir,
                self.journal_name,
                checkpoint_bytes=self._checkpoint[0],
                checkpoint_interval=self._checkpoint[1],
                placed_bytes=self._placed_bytes,
                boot_id=self.boot_id,
            )
            j.open()
            self.journals[data_dir] = j
        return j

    # -- start-up ---------------------------------------------------------------------------

    def list_replicas(self) -> ReplicaListing:
        """Scan every data directory's headers and rebuild the in-memory index."""
        listing = ReplicaListing()
        index: dict[tuple[str, int], str] = {}
        for d in self.data_dirs:
            if d in self.failed:
                listing.failed_dirs.append(self.failed[d])
                continue
            try:
                with data_dir_io(d):
                    self._scan_dir(d, listing, index)
            except DataDirFailed as exc:
                self.failed[d] = exc
                listing.failed_dirs.append(exc)
        self._index = index
        return listing

    def _scan_dir(self, d: str, listing: ReplicaListing, index: dict[tuple[str, int], str]) -> None:
        root = Path(d) / EXTENTS_DIR
        if not Path(d).is_dir():
            raise OSError(errno.ENOENT, "data directory is missing")
        self._devices.setdefault(d, os.stat(d).st_dev)
        # replayed before any header is read (it may move their seqs); a journal that cannot
        # be opened (e.g. mounted read-only) still lets the headers be listed, and opening a
        # replica there for update fails with the same error
        journal = None
        with contextlib.suppress(DataDirFailed):
            journal = self.journal(d)
        if not root.is_dir():
            return
        for vol_dir in sorted(root.iterdir()):
            if not vol_dir.is_dir():
                listing.problems.append(ReplicaProblem(str(vol_dir), "not a volume directory"))
                continue
            names = {p.name for p in vol_dir.iterdir()}
            headers = set()
            for name in sorted(names):
                path = vol_dir / name
                m = _HEADER_NAME.fullmatch(name)
                if m is None:
                    stem = name.rsplit(".", 1)[0]
                    if f"{stem}.hdr" not in names:
                        listing.problems.append(
                            ReplicaProblem(
                                str(path), "no header: left over by an unfinished create"
                            )
                        )
                    continue
                headers.add(name)
                try:
                    h, _ = self._read_header(path)
                except HeaderDamaged as exc:
                    listing.problems.append(ReplicaProblem(str(path), exc.reason))
                    continue
                key = (h.volume, h.extent)
                if not self.owns(*key):
                    continue  # another worker's (workers.py)
                if h.volume != vol_dir.name or h.extent != int(m.group(1), 16):
                    listing.problems.append(
                        ReplicaProblem(str(path), f"header names {h.volume}/{h.extent}")
                    )
                elif key in index:
                    listing.problems.append(
                        ReplicaProblem(str(path), f"duplicate replica, also in {index[key]}")
                    )
                else:
                    index[key] = d
                    if journal is not None:  # (its records since a replay, if any)
                        h = h.evolve(applied_seq=journal.applied(h))
                    listing.replicas.append(ReplicaInfo.of(h, d))

    @staticmethod
    def _read_header(path: Path) -> tuple[Header, int]:
        raw = path.read_bytes()
        try:
            return decode_file(raw)
        except SlotError as exc:
            raise HeaderDamaged(str(path), str(exc)) from None

    def check_data_dirs(self) -> list[DataDirFailed]:
        """Probe each data directory (exists, writable, fsync works); newly failed ones."""
        newly = []
        for d in self.data_dirs:
            if d in self.failed:
                continue
            # one name per process: a chunk server's workers probe the same directories
            probe = Path(d) / f".lunastor-probe.{os.getpid()}"
            try:
                with data_dir_io(d):
                    dev = os.stat(d).st_dev
                    if self._devices.setdefault(d, dev) != dev:
                        raise OSError(errno.ENODEV, "data directory was unmounted or replaced")
                    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    try:
                        os.write(fd, b"probe")
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    probe.unlink()
            except SpaceExhausted:
                continue  # full is not failed
            except DataDirFailed as exc:
                self.failed[d] = exc
                newly.append(exc)
        return newly

    # -- replicas ---------------------------------------------------------------------------

    def paths(self, data_dir: str, volume: str, extent: int) -> ReplicaPaths:
        base = Path(data_dir) / EXTENTS_DIR / volume / f"{extent:016x}"
        return ReplicaPaths(
            data_dir=data_dir,
            header=base.with_suffix(".hdr"),
            data=base.with_suffix(".dat"),
            sums=base.with_suffix(".sum"),
        )

    def _check(self, volume: str, extent: int) -> None:
        _check_key(volume, extent)
        if not self.owns(volume, extent):
            raise InvalidRequest(f"extent {volume}/{extent} belongs to another worker")

    def _locate(self, volume: str, extent: int) -> str | None:
        key = (volume, extent)
        d = self._index.get(key)
        if d is not None and d not in self.failed and self.paths(d, volume, extent).header.exists():
            return d
        for d in self.data_dirs:
            if d not in self.failed and self.paths(d, volume, extent).header.exists():
                if self.owns(volume, extent):  # (a clone made for another worker: not ours)
                    self._index[key] = d
                return d
        return None

    async def create(
        self, volume: str, extent: int, gen: int, state: ReplicaState = ReplicaState.CURRENT
    ) -> Replica:
        """A new, empty (all unmapped, no space used) replica at generation `gen`."""
        self._check(volume, extent)
        key = (volume, extent)
        async with self._opening.setdefault(key, asyncio.Lock()):
            if key in self._open or self._locate(volume, extent) is not None:
                raise ReplicaExists(volume, extent)
            d = self._pick_dir()
            with data_dir_io(d):
                self.journal(d)
            p = self.paths(d, volume, extent)
            h = Header(
                volume=volume,
                extent=extent,
                extent_size=self.extent_size,
                block_size=BLOCK_SIZE,
                generation=gen,
                applied_seq=0,
                durable_seq=0,
                state=ReplicaState(state),
                counter=1,
            )
            try:
                with data_dir_io(d):
                    await asyncio.to_thread(self._create_files, p, h)
            except (SpaceExhausted, DataDirFailed):
                for path in (p.data, p.sums, p.header.with_suffix(".tmp")):
                    path.unlink(missing_ok=True)
                raise
            self._index[key] = d
            return await self._open_files(p)

    def _create_files(self, p: ReplicaPaths, h: Header) -> None:
        p.header.parent.mkdir(parents=True, exist_ok=True)
        nblocks = self.extent_size // BLOCK_SIZE
        for path, size in ((p.data, self.extent_size), (p.sums, nblocks * CHECKSUM_SIZE)):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, size)  # sparse: thin until written
                os.fsync(fd)
            finally:
                os.close(fd)
        tmp = p.header.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            # slot 0 holds the header, slot 1 starts invalid (zeros); both really allocated
            os.write(fd, encode_slot(h) + bytes(SLOT_SIZE))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p.header)
        dir_fd = os.open(p.header.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    async def clone(self, source: str, extent: int, volume: str, gen: int) -> Replica | None:
        """A new replica of `volume`/`extent` holding a copy of replica `source`/`extent`
        (docs/snapshots.md): in the source's data directory, so copy_file_range can share
        blocks. A left-over `volume`/`extent` (an interrupted earlier copy) is replaced: the
        caller only clones into names nobody writes yet. The source must be ours; a copy
        that belongs to another worker of the server (chunk/workers.py) is made for it and
        closed here (None): that worker opens it from the disk."""
        _check_key(volume, extent)
        src = await self.open(source, extent)
        key = (volume, extent)
        async with self._opening.setdefault(key, asyncio.Lock()):
            old = self._open.get(key)
            if old is not None:
                await old.delete()
            else:
                where = self._locate(volume, extent)
                if where is not None:
                    await self._forget(where, volume, extent)
                    with data_dir_io(where):
                        self._unlink(self.paths(where, volume, extent))
            d = src.paths.data_dir
            p = self.paths(d, volume, extent)
            h = Header(
                volume=volume,
                extent=extent,
                extent_size=self.extent_size,
                block_size=BLOCK_SIZE,
                generation=gen,
                applied_seq=0,
                durable_seq=0,
                state=ReplicaState.CURRENT,
                counter=1,
            )
            try:
                with data_dir_io(d):
                    fds = await asyncio.to_thread(self._open_copy_files, p)
                    try:
                        await src.copy_files_to(*fds)
                        for fd in fds:
                            await asyncio.to_thread(os.fsync, fd)
                    finally:
                        for fd in fds:
                            os.close(fd)
                    await asyncio.to_thread(self._write_header, p, h)
            except BaseException:
                with contextlib.suppress(OSError):
                    self._unlink(p)
                raise
            if not self.owns(volume, extent):
                return None  # whole on disk, header last: another worker's from now on
            self._index[key] = d
            return await self._open_files(p)

    def _open_copy_files(self, p: ReplicaPaths) -> tuple[int, int]:
        p.header.parent.mkdir(parents=True, exist_ok=True)
        nblocks = self.extent_size // BLOCK_SIZE
        fds = []
        for path, size in ((p.data, self.extent_size), (p.sums, nblocks * CHECKSUM_SIZE)):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(fd, size)
            fds.append(fd)
        return fds[0], fds[1]

    def _write_header(self, p: ReplicaPaths, h: Header) -> None:
        tmp = p.header.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, encode_slot(h) + bytes(SLOT_SIZE))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p.header)
        dir_fd = os.open(p.header.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    async def _forget(self, d: str, volume: str, extent: int) -> None:
        """Before files of a replica that is not open are removed (see Replica.delete)."""
        with data_dir_io(d):
            j = self.journal(d)
        if j is not None:
            await j.forget(volume, extent)

    @staticmethod
    def _unlink(p: ReplicaPaths) -> None:
        # header first: without it the replica no longer exists
        for path in (p.header, p.header.with_suffix(".tmp"), p.data, p.sums):
            path.unlink(missing_ok=True)

    async def remove(self, volume: str, extent: int) -> bool:
        """Delete a replica's files (garbage collection); False if there was none. A replica
        whose header is damaged is removed too: nothing refers to it any more."""
        self._check(volume, extent)
        key = (volume, extent)
        try:
            replica = await self.open(volume, extent)
        except ReplicaNotFound:
            return False
        except HeaderDamaged:
            d = self._locate(volume, extent)
            if d is None:
                return False
            await self._forget(d, volume, extent)
            with data_dir_io(d):
                self._unlink(self.paths(d, volume, extent))
            self._index.pop(key, None)
            return True
        await replica.delete()
        self._index.pop(key, None)
        parent = replica.paths.header.parent
        with contextlib.suppress(OSError):
            parent.rmdir()  # the volume's last replica here: drop its directory too
        return True

    def _pick_dir(self) -> str:
        best: tuple[int, str] | None = None
        for d in self.data_dirs:
            if d in self.failed:
                continue
            try:
                st = os.statvfs(d)
                self._devices.setdefault(d, os.stat(d).st_dev)
            except OSError as exc:
                self.failed[d] = DataDirFailed(d, exc.errno, exc.strerror or str(exc))
                continue
            free = st.f_bavail * st.f_frsize
            if best is None or free > best[0]:
                best = (free, d)
        if best is None:
            raise DataDirFailed(",".join(self.data_dirs), None, "no data directory in service")
        return best[1]

    def opened(self, volume: str, extent: int) -> Replica | None:
        """The replica if it is open already (no waiting, no file system access)."""
        return self._open.get((volume, extent))

    async def open(self, volume: str, extent: int) -> Replica:
        """The open replica (one object per replica), recovering it first after a crash."""
        key = (volume, extent)
        replica = self._open.get(key) if type(volume) is str and type(extent) is int else None
        if replica is not None:  # the hot path: no key check, no lock (it was opened so)
            return replica
        self._check(volume, extent)
        async with self._opening.setdefault(key, asyncio.Lock()):
            replica = self._open.get(key)
            if replica is not None:
                return replica
            d = self._locate(volume, extent)
            if d is None:
                raise ReplicaNotFound(volume, extent)
            return await self._open_files(self.paths(d, volume, extent))

    async def _open_files(self, p: ReplicaPaths) -> Replica:
        fds: list[int] = []
        journal = None
        try:
            with data_dir_io(p.data_dir):
                journal = self.journal(p.data_dir)
                for path in (p.header, p.data, p.sums):
                    fds.append(os.open(path, os.O_RDWR))
                raw = pread_exact(fds[0], HEADER_FILE_SIZE, 0)
            try:
                h, slot = decode_file(raw)
            except SlotError as exc:
                raise HeaderDamaged(str(p.header), str(exc)) from None
            if h.extent_size != self.extent_size or h.block_size != BLOCK_SIZE:
                raise HeaderDamaged(
                    str(p.header),
                    f"extent size {h.extent_size}/block {h.block_size} differ from the "
                    f"store's {self.extent_size}/{BLOCK_SIZE}",
                )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        replica = Replica(p, h, slot, (fds[0], fds[1], fds[2]), self.boot_id, self._gone, journal)
        try:
            await replica.recover()
        except BaseException:
            replica.abandon()
            raise
        self._open[(h.volume, h.extent)] = replica
        return replica

    def _gone(self, replica: Replica) -> None:
        key = (replica.volume, replica.extent)
        if self._open.get(key) is replica:
            del self._open[key]
        try:
            gone = not replica.paths.header.exists()
        except OSError:  # a failing data directory: it is retired, not indexed
            gone = True
        if gone:
            self._index.pop(key, None)

    def retire_dir(self, failed: DataDirFailed) -> list[tuple[str, int]]:
        """Take a failed data directory out of service: nothing is created, opened or kept
        open there any more. Returns (volume, extent) of the replicas it held."""
        d = failed.path
        self.failed.setdefault(d, failed)
        # listed before closing: closing forgets the index entries of files that are gone
        lost = sorted(k for k, where in self._index.items() if where == d)
        lost += [k for k, r in self._open.items() if r.paths.data_dir == d and k not in lost]
        for replica in list(self._open.values()):
            if replica.paths.data_dir == d:
                replica.abandon()  # its files are unusable: never write its header again
        j = self.journals.pop(d, None)
        if j is not None:
            j.abandon()
        for key in lost:
            self._index.pop(key, None)
        return sorted(lost)

    def has_replica(self, volume: str, extent: int) -> bool:
        """A replica of (volume, extent) exists on a data directory in service."""
        return self.owns(volume, extent) and self._locate(volume, extent) is not None

    def known_replicas(self) -> list[tuple[str, int]]:
        """(volume, extent) of every replica indexed on a data directory in service."""
        return sorted(k for k, d in self._index.items() if d not in self.failed)

    def open_replicas(self) -> list[Replica]:
        return list(self._open.values())

    async def close(self) -> None:
        """Close every open replica cleanly (flushed, headers marked clean)."""
        for replica in list(self._open.values()):
            try:
                await replica.close()
            except DataDirFailed:
                continue  # reported through the replica's own IO; nothing more to do here
        for j in list(self.journals.values()):
            await j.close()  # every replica synced at its close: the journal starts over
        self.journals.clear()


def _check_key(volume: str, extent: int) -> None:
    if not isinstance(volume, str) or not _VOLUME_ID.fullmatch(volume):
        raise InvalidRequest(
            f"volume id {volume!r}: expected 1..{MAX_VOLUME_ID} of [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    if not isinstance(extent, int) or isinstance(extent, bool) or not 0 <= extent < 2**63:
        raise InvalidRequest(f"extent index {extent!r} out of range")


__all__ = ["DEFAULT_EXTENT_SIZE", "FORMAT_VERSION", "ExtentStore", "HeaderFlags"]
