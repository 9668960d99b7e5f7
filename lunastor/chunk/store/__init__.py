"""The on-disk extent store (docs/extent-format.md)."""

from lunastor.chunk.store.checksums import BLOCK_SIZE, CHECKSUM_SIZE, UNMAPPED
from lunastor.chunk.store.errors import (
    ChecksumMismatch,
    DataDirFailed,
    ExtentStoreError,
    FutureGeneration,
    GenerationMismatch,
    HeaderDamaged,
    InvalidRequest,
    OutOfOrder,
    ReplicaClosed,
    ReplicaExists,
    ReplicaNotCurrent,
    ReplicaNotFound,
    SpaceExhausted,
    StaleGeneration,
)
from lunastor.chunk.store.header import FORMAT_VERSION, ReplicaState
from lunastor.chunk.store.replica import OrderingLock, Replica, ReplicaInfo
from lunastor.chunk.store.store import (
    DEFAULT_EXTENT_SIZE,
    ExtentStore,
    ReplicaListing,
    ReplicaProblem,
)

__all__ = [
    "BLOCK_SIZE",
    "CHECKSUM_SIZE",
    "DEFAULT_EXTENT_SIZE",
    "FORMAT_VERSION",
    "UNMAPPED",
    "ChecksumMismatch",
    "DataDirFailed",
    "ExtentStore",
    "ExtentStoreError",
    "FutureGeneration",
    "GenerationMismatch",
    "HeaderDamaged",
    "InvalidRequest",
    "OrderingLock",
    "OutOfOrder",
    "Replica",
    "ReplicaClosed",
    "ReplicaExists",
    "ReplicaInfo",
    "ReplicaListing",
    "ReplicaNotCurrent",
    "ReplicaNotFound",
    "ReplicaProblem",
    "ReplicaState",
    "SpaceExhausted",
    "StaleGeneration",
]
