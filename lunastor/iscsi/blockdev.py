"""The block-device interface the SCSI layer executes against (ARCHITECTURE.md, "Block device").

A local sparse file, memory and the replicated volume all implement `BlockDevice`. Errors are
typed so that each maps one-to-one onto SCSI sense data (see `scsi.sense`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lunastor.iscsi.scsi.types import Nexus


class BlockDeviceError(Exception):
    """Base class: every error a block device may raise to the SCSI layer."""


class OutOfRange(BlockDeviceError):
    """LBA range beyond the end of the device -> ILLEGAL REQUEST / LBA OUT OF RANGE."""


class MediumError(BlockDeviceError):
    """Unrecoverable read or write failure -> MEDIUM ERROR / UNRECOVERED READ ERROR (or WRITE)."""

    def __init__(self, message: str = "", *, lba: int | None = None, write: bool = False) -> None:
        super().__init__(message)
        self.lba = lba
        self.write = write


class SpaceExhausted(BlockDeviceError):
    """Thin provisioning could not allocate -> DATA PROTECT / SPACE ALLOCATION FAILED."""


class NotReady(BlockDeviceError):
    """Temporarily unavailable (no quorum, failover) -> NOT READY / LU NOT ACCESSIBLE, retryable."""


class WriteProtected(BlockDeviceError):
    """Write to a read-only device -> DATA PROTECT / WRITE PROTECTED."""


class NexusLost(BlockDeviceError):
    """The command's I_T nexus logged in again (elsewhere) and its newer login fenced this
    write: nothing was written -> ABORTED COMMAND / I_T NEXUS LOSS OCCURRED."""


class Miscompare(BlockDeviceError):
    """COMPARE AND WRITE verify failed -> MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"miscompare at byte offset {offset}")
        self.offset = offset  # byte offset of the first differing byte within the verify data


class LbaState(Enum):
    MAPPED = 0
    DEALLOCATED = 1


@dataclass(frozen=True, slots=True)
class LbaStatus:
    """One run of blocks with the same provisioning state, starting at `lba`."""

    lba: int
    blocks: int
    state: LbaState


@runtime_checkable
class BlockDevice(Protocol):
    """An async block device. Sizes are in logical blocks of `block_size` bytes."""

    @property
    def block_size(self) -> int: ...  # logical block size in bytes (512 by default)

    @property
    def physical_block_size(self) -> int: ...  # 4096: the checksum and allocation granularity

    @property
    def num_blocks(self) -> int: ...  # current capacity in logical blocks

    @property
    def read_only(self) -> bool: ...

    @property
    def thin(self) -> bool: ...  # supports unmap and reports deallocated blocks

    @property
    def capacity_generation(self) -> int: ...

    # Increments each time the capacity changes; the SCSI layer compares it with what each
    # I_T nexus last saw to raise CAPACITY DATA HAS CHANGED.

    async def read(self, lba: int, blocks: int) -> bytes | bytearray | memoryview: ...

    # Mutations name the I_T nexus they come from (None: not from an initiator), so that a
    # replicated device can fence writes of a superseded login; local devices ignore it.

    async def write(
        self, lba: int, data: bytes | bytearray | memoryview, fua: bool, nexus: Nexus | None = None
    ) -> None: ...

    async def flush(self) -> None: ...

    async def unmap(
        self, ranges: Sequence[tuple[int, int]], nexus: Nexus | None = None
    ) -> None: ...  # (lba, blocks) pairs

    async def write_same(
        self,
        lba: int,
        blocks: int,
        pattern: bytes | bytearray | memoryview,
        unmap: bool,
        nexus: Nexus | None = None,
    ) -> None: ...

    async def compare_and_write(
        self,
        lba: int,
        verify: bytes | bytearray | memoryview,
        data: bytes | bytearray | memoryview,
        nexus: Nexus | None = None,
    ) -> None: ...  # atomic; raises Miscompare

    async def lba_status(self, lba: int) -> Sequence[LbaStatus]: ...  # runs starting at lba


@runtime_checkable
class InlineBlockDevice(BlockDevice, Protocol):
    """A block device that can also answer synchronously, on the caller's thread: the inline
    I/O contract of the iSCSI command fast path (docs/iscsi-protocol.md, "Fast path").

    `read_inline` and `write_inline` do what `read` and `write(..., fua=False)` do, without
    awaiting: they are for devices whose I/O costs microseconds and never waits on anything
    but the page cache (a local file, memory). They raise the same `BlockDeviceError`s;
    the fast path then runs the command again through the full path, which reports it.
    The buffer `read_inline` returns is never changed afterwards (it is sent as is).
    `inline_ok` is read before every inline command: a device, or a wrapper such as a QoS
    limiter, turns it off to send its commands through the awaitable path instead.
    A device that can answer reads inline but never writes (a replicated volume) sets a class
    attribute `inline_writes = False`, so that its writes skip the attempt.
    """

    @property
    def inline_ok(self) -> bool: ...

    def read_inline(self, lba: int, blocks: int) -> bytes | bytearray | memoryview: ...

    def write_inline(self, lba: int, data: bytes | bytearray | memoryview) -> None: ...
