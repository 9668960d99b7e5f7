"""Low-level file operations the extent store needs and `os` does not offer.

fallocate(2) is reached through ctypes: `os.posix_fallocate` may silently fall back to writing
zeros, and there is no `os` binding for FALLOC_FL_PUNCH_HOLE.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from lunastor.chunk.store.errors import DataDirFailed, SpaceExhausted

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

# Errors that mean "the file system is full" rather than "the directory is broken".
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError with errno set."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def preallocate(fd: int, offset: int, length: int) -> bool:
    """Reserve blocks so a later overwrite of the range cannot run out of space.

    Contents are unchanged (holes become unwritten extents that read as zeros). Returns False
    when the file system cannot preallocate (then a write may still hit ENOSPC half-way).
    """
    try:
        fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise
    return True


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range (it then reads as zeros). False if the file system cannot."""
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise
    return True


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """pwrite until everything is written: a short write is how a full disk first shows."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # pragma: no cover - pwrite raises rather than returning 0 on regular files
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view = view[n:]
        offset += n


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """pread `length` bytes; a short read (file shorter than expected) is padded with zeros.

    Our data and checksum files are always sized to their full length with ftruncate, so a
    short read only happens on a truncated file, whose missing tail is a hole by definition.
    """
    data = os.pread(fd, length, offset)
    if len(data) < length:
        data += bytes(length - len(data))
    return data


def current_boot_id() -> bytes:
    """This boot's identity (16 bytes): a replica dirty under another boot lost its page cache."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):  # pragma: no cover - every Linux we run on has it
        return bytes(16)


@contextmanager
def data_dir_io(path: str) -> Iterator[None]:
    """Turn OSErrors from a data directory into the two errors the server acts on."""
    try:
        yield
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise SpaceExhausted(path) from exc
        raise DataDirFailed(path, exc.errno, exc.strerror or str(exc)) from exc


def copy_sparse(src_fd: int, dst_fd: int, size: int) -> int:
    """Copy the allocated ranges of `src_fd` into `dst_fd` (already `size` bytes, sparse).

    Holes are skipped (SEEK_DATA/SEEK_HOLE), so a thin file stays thin; each data run goes
    through copy_file_range(2), which shares the blocks (a reflink) on XFS and btrfs and
    copies in the kernel elsewhere. Returns the bytes copied.
    """
    copied = 0
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src_fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            raise
        if start >= size:
            break
        end = min(os.lseek(src_fd, start, os.SEEK_HOLE), size)
        off = start
        while off < end:
            n = os.copy_file_range(src_fd, dst_fd, end - off, off, off)
            if n == 0:  # the source shrank under us: nothing more to copy
                return copied
            off += n
            copied += n
        pos = end
    return copied
