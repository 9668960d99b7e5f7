"""The replica header file: two 512-byte slots written alternately (docs/extent-format.md).

Each write goes to the slot not holding the newest valid header, with `counter + 1`, so a torn
write (power lost mid-sector) destroys at most the slot being written and the reader falls back
to the other one. A slot is valid when its magic and xxh64 match and its version is accepted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from enum import IntEnum, IntFlag

import xxhash

MAGIC = b"LUNAEXT\n"
FORMAT_VERSION = 1
# Readers accept the current and the previous format version (ARCHITECTURE.md, "Versions").
# Version 1 is the first, so there is no previous one yet; a v2 reader keeps a v1 parser here.
ACCEPTED_VERSIONS = frozenset({FORMAT_VERSION, FORMAT_VERSION - 1}) - {0}

SLOT_SIZE = 512
HEADER_FILE_SIZE = 2 * SLOT_SIZE
MAX_VOLUME_ID = 64

# magic, version, flags, block_size, extent_size, extent, generation, applied_seq, durable_seq,
# state, volume length, reserved(6), counter, boot_id, intent offset, intent length, volume
_V1 = struct.Struct(">8sHHIQQQQQBB6sQ16sQQ64s")
_BODY = SLOT_SIZE - 8  # the last 8 bytes hold xxh64 of the first 504
assert _V1.size <= _BODY


class ReplicaState(IntEnum):
    CURRENT = 0  # a member of the current generation: serves reads, takes ordered writes
    SYNCING = 1  # catching up: takes ordered writes and copies, serves no reads
    STALE = 2  # missed writes: only copies (catch-up/rebuild) may change it


class HeaderFlags(IntFlag):
    NONE = 0
    DIRTY = 1  # written since the last clean close, in the boot named by `boot_id`
    NEEDS_RESCAN = 2  # lost page cache: stored checksums may not describe the data


class SlotError(Exception):
    """A slot that is not a valid header (the reason says why)."""


@dataclass(frozen=True, slots=True)
class Header:
    volume: str
    extent: int
    extent_size: int
    block_size: int
    generation: int
    applied_seq: int
    durable_seq: int
    state: ReplicaState
    flags: HeaderFlags = HeaderFlags.NONE
    boot_id: bytes = bytes(16)
    intent_offset: int = 0
    intent_length: int = 0  # 0: no write was in progress
    counter: int = 0
    version: int = FORMAT_VERSION

    def evolve(self, **changes: object) -> Header:
        return replace(self, **changes)  # type: ignore[arg-type]


def encode_slot(
    h: Header, *, counter: int | None = None, intent: tuple[int, int] | None = None
) -> bytes:
    """The slot for `h`, with `counter` and `intent` (offset, length) in place of its own
    when given (the replica's hot path writes them without building a new Header)."""
    volume = h.volume.encode()
    if not 0 < len(volume) <= MAX_VOLUME_ID:
        raise ValueError(f"volume id must be 1..{MAX_VOLUME_ID} bytes")
    body = _V1.pack(
        MAGIC,
        FORMAT_VERSION,
        int(h.flags),
        h.block_size,
        h.extent_size,
        h.extent,
        h.generation,
        h.applied_seq,
        h.durable_seq,
        int(h.state),
        len(volume),
        bytes(6),
        h.counter if counter is None else counter,
        h.boot_id,
        h.intent_offset if intent is None else intent[0],
        h.intent_length if intent is None else intent[1],
        volume,
    ).ljust(_BODY, b"\0")
    return body + xxhash.xxh64_digest(body)


def _decode_v1(slot: bytes) -> Header:
    (
        _magic,
        version,
        flags,
        block_size,
        extent_size,
        extent,
        generation,
        applied_seq,
        durable_seq,
        state,
        volume_len,
        _reserved,
        counter,
        boot_id,
        intent_offset,
        intent_length,
        volume,
    ) = _V1.unpack_from(slot)
    if not 0 < volume_len <= MAX_VOLUME_ID:
        raise SlotError(f"bad volume id length {volume_len}")
    try:
        state = ReplicaState(state)
        name = volume[:volume_len].decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise SlotError(f"bad field: {exc}") from None
    if flags & ~int(HeaderFlags.DIRTY | HeaderFlags.NEEDS_RESCAN):
        raise SlotError(f"unknown flags {flags:#x}")
    return Header(
        volume=name,
        extent=extent,
        extent_size=extent_size,
        block_size=block_size,
        generation=generation,
        applied_seq=applied_seq,
        durable_seq=durable_seq,
        state=state,
        flags=HeaderFlags(flags),
        boot_id=boot_id,
        intent_offset=intent_offset,
        intent_length=intent_length,
        counter=counter,
        version=version,
    )


_DECODERS = {1: _decode_v1}


def decode_slot(slot: bytes) -> Header:
    if len(slot) < SLOT_SIZE:
        raise SlotError(f"truncated slot ({len(slot)} bytes)")
    if slot[:8] != MAGIC:
        raise SlotError("bad magic" if any(slot) else "empty slot")
    if xxhash.xxh64_digest(slot[:_BODY]) != slot[_BODY:SLOT_SIZE]:
        raise SlotError("checksum mismatch (torn write?)")
    version = int.from_bytes(slot[8:10], "big")
    decoder = _DECODERS.get(version)
    if decoder is None or version not in ACCEPTED_VERSIONS:
        raise SlotError(f"unsupported format version {version}")
    return decoder(slot)


def decode_file(raw: bytes) -> tuple[Header, int]:
    """The newest valid header and the slot it is in; SlotError naming both slots' faults."""
    found: list[tuple[Header, int]] = []
    reasons = []
    for index in range(2):
        try:
            found.append((decode_slot(raw[index * SLOT_SIZE : (index + 1) * SLOT_SIZE]), index))
        except SlotError as exc:
            reasons.append(f"slot {index}: {exc}")
    if not found:
        size = f"{len(raw)} bytes"
        raise SlotError(f"no valid header slot ({size}; {'; '.join(reasons)})")
    return max(found, key=lambda pair: pair[0].counter)
