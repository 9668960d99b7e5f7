"""Per-block checksums: xxh64 of each 4 KiB block, 8 bytes big-endian, 0 meaning "unmapped".

A mapped block whose xxh64 happens to be 0 is stored as 1, so that 0 is free to mark blocks
that were never written or were unmapped (and a sparse, all-zero sidecar means "all unmapped").
This merges two of 2**64 checksum values, which costs nothing measurable in detection power.
"""

from __future__ import annotations

from array import array

import xxhash

BLOCK_SIZE = 4096
CHECKSUM_SIZE = 8
UNMAPPED = bytes(CHECKSUM_SIZE)
_ZERO_REMAP = (1).to_bytes(CHECKSUM_SIZE, "big")


def block_checksum(block: bytes | bytearray | memoryview) -> bytes:
    digest = xxhash.xxh64_digest(block)
    return _ZERO_REMAP if digest == UNMAPPED else digest


def checksums_of(data: bytes | bytearray | memoryview) -> bytes:
    """Checksums of consecutive whole blocks (len(data) must be a multiple of BLOCK_SIZE)."""
    view = memoryview(data)
    digest = xxhash.xxh64_digest
    # one list comprehension, the rare zero digest remapped afterwards: ~20% less time for
    # a 1 MiB write than a call of block_checksum per block
    out = [digest(view[i : i + BLOCK_SIZE]) for i in range(0, len(view), BLOCK_SIZE)]
    if UNMAPPED in out:
        out = [_ZERO_REMAP if d == UNMAPPED else d for d in out]
    return b"".join(out)


def count_mapped(sums: bytes | bytearray | memoryview) -> int:
    """How many entries are not UNMAPPED (byte order does not matter for a test against 0)."""
    values = array("Q")
    values.frombytes(bytes(sums))
    return len(values) - values.count(0)


def mapped_flags(sums: bytes | bytearray | memoryview) -> list[bool]:
    """One flag per entry: is the block mapped (byte order does not matter against 0)."""
    values = array("Q")
    values.frombytes(bytes(sums))
    return [v != 0 for v in values]


def bad_blocks(
    data: bytes | bytearray | memoryview, sums: bytes | bytearray | memoryview, first: int
) -> list[int]:
    """Indices (offset by `first`) of mapped blocks of `data` that fail their checksum."""
    view = memoryview(data)
    table = bytes(sums)
    digest = xxhash.xxh64_digest
    bad = []
    for i in range(len(view) // BLOCK_SIZE):
        want = table[i * CHECKSUM_SIZE : (i + 1) * CHECKSUM_SIZE]
        if want == UNMAPPED:
            continue
        got = digest(view[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
        if got != want and not (got == UNMAPPED and want == _ZERO_REMAP):
            bad.append(first + i)
    return bad


def runs(flags: list[bool]) -> list[tuple[int, int, bool]]:
    """Group a list of flags into (start, count, flag) runs."""
    out: list[tuple[int, int, bool]] = []
    for i, flag in enumerate(flags):
        if out and out[-1][2] == flag:
            start, count, _ = out[-1]
            out[-1] = (start, count + 1, flag)
        else:
            out.append((i, 1, flag))
    return out
