"""Buffers reused instead of allocated per command (no fresh 1 MiB bytearray per write).

A pooled bytearray is handed out again only once nothing refers to it any more: a bytearray
with exported views (a memoryview the SCSI layer still holds, or one a transport has not
finished sending) refuses to change size, which is the test. Each size class is a ring whose
oldest buffer is tried first, which in steady state is free. The same scheme serves the
replicated volume's local reads (`chunk/access/local_read.py`).
"""

from __future__ import annotations

from collections import deque

MIN_CLASS = 4096


def unexported(buf: bytearray) -> bool:
    """True when no memoryview (or other buffer export) of `buf` is alive."""
    try:
        buf.append(0)
    except BufferError:
        return False
    del buf[-1]
    return True


class BufferPool:
    """Bytearrays by size class (powers of two from 4 KiB up to `max_pooled`)."""

    def __init__(self, max_pooled: int = 1 << 20, per_class: int = 16) -> None:
        self.max_pooled = max_pooled
        self.per_class = per_class
        self._rings: dict[int, deque[bytearray]] = {}
        self.allocated = 0  # bytearrays created (tests: reuse means this stays put)

    def take(self, nbytes: int) -> bytearray:
        """A bytearray of at least `nbytes` (its contents are whatever was there before)."""
        if nbytes > self.max_pooled:
            self.allocated += 1
            return bytearray(nbytes)
        size = max(MIN_CLASS, 1 << (nbytes - 1).bit_length())
        ring = self._rings.get(size)
        if ring is None:
            ring = self._rings[size] = deque()
        for _ in range(len(ring)):
            buf = ring[0]
            ring.rotate(-1)
            if unexported(buf):
                return buf
        buf = bytearray(size)
        self.allocated += 1
        if len(ring) < self.per_class:
            ring.append(buf)
        return buf
