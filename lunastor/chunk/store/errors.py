"""Typed errors of the extent store.

Each maps onto one wire status (docs/data-protocol.md) and, where it reaches an initiator, onto
one SCSI sense code: `SpaceExhausted` is also the block device's `SpaceExhausted`, so the SCSI
layer reports DATA PROTECT / SPACE ALLOCATION FAILED for it without a translation table.
"""

from __future__ import annotations

from collections.abc import Sequence

from lunastor.iscsi import blockdev


class ExtentStoreError(Exception):
    """Base class of every error the extent store raises."""


class InvalidRequest(ExtentStoreError):
    """The caller asked for something malformed: a range outside the extent, a bad name."""


class ReplicaNotFound(ExtentStoreError):
    def __init__(self, volume: str, extent: int) -> None:
        super().__init__(f"no replica of {volume}/{extent} on this server")
        self.volume = volume
        self.extent = extent


class ReplicaExists(ExtentStoreError):
    def __init__(self, volume: str, extent: int) -> None:
        super().__init__(f"a replica of {volume}/{extent} already exists")
        self.volume = volume
        self.extent = extent


class ReplicaClosed(ExtentStoreError):
    """The replica was closed or deleted; open it again (or it is gone)."""


class ReplicaNotCurrent(ExtentStoreError):
    """A syncing or stale replica never serves reads; a stale one takes no ordered writes."""

    def __init__(self, state: int, what: str) -> None:
        super().__init__(f"replica is {state!r}: it cannot {what}")
        self.state = state


class GenerationMismatch(ExtentStoreError):
    """The request's generation is not the replica's current one."""

    def __init__(self, current: int, got: int) -> None:
        super().__init__(f"generation {got} does not match the replica's generation {current}")
        self.current = current
        self.got = got


class StaleGeneration(GenerationMismatch):
    """The request carries an older generation than the replica knows: the sender is fenced."""


class FutureGeneration(GenerationMismatch):
    """The request carries a newer generation: this replica has not been told it yet."""


class OutOfOrder(ExtentStoreError):
    """`seq` is not `applied_seq + 1`. `got < expected` means that write was already applied."""

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"expected sequence number {expected}, got {got}")
        self.expected = expected
        self.got = got


class ChecksumMismatch(ExtentStoreError):
    """Blocks (indices of 4 KiB blocks within the extent) whose data fails its checksum."""

    def __init__(self, blocks: Sequence[int]) -> None:
        shown = ", ".join(str(b) for b in list(blocks)[:16])
        more = "" if len(blocks) <= 16 else f" and {len(blocks) - 16} more"
        super().__init__(f"checksum mismatch in blocks {shown}{more}")
        self.blocks = list(blocks)


class SpaceExhausted(ExtentStoreError, blockdev.SpaceExhausted):
    """The data directory's file system is full (ENOSPC/EDQUOT); nothing was half-applied."""

    def __init__(self, path: str) -> None:
        super().__init__(f"no space left in {path}")
        self.path = path


class DataDirFailed(ExtentStoreError):
    """A data directory returned an IO error or disappeared: take it out of service."""

    def __init__(self, path: str, errno: int | None = None, detail: str = "") -> None:
        super().__init__(f"data directory {path} failed: {detail or errno}")
        self.path = path
        self.errno = errno


class HeaderDamaged(ExtentStoreError):
    """A replica header with no valid slot (torn, truncated, foreign, or an unknown version)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
