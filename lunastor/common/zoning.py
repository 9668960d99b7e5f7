"""Placing a volume's extent in the zones its CSI topology allows (VolumeRecord.zones).

The ring places every volume alike; a volume restricted to some zones keeps the ring's
choices that are in those zones and fills up from the other live servers there, chosen by
rendezvous hashing of (volume, extent, server) so that every allocator picks the same ones.
Pure; table-tested in tests/unit/test_zoning.py."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence


def _score(volume: str, index: int, server: str) -> bytes:
    return hashlib.blake2b(f"{volume}/{index}/{server}".encode(), digest_size=8).digest()


def restrict_to_zones(
    placed: Sequence[str],
    zone_of: Mapping[str, str],
    zones: Sequence[str],
    copies: int,
    volume: str,
    index: int,
) -> list[str]:
    """Up to `copies` servers for extent (`volume`, `index`), all in `zones`: the ring's
    `placed` servers there first (in ring order, so its primary stays primary), then the
    live servers of `zones` (`zone_of`: live server -> zone) by rendezvous hash. Without
    zones, `placed` is returned unchanged."""
    if not zones:
        return list(placed)
    allowed = set(zones)
    chosen = [s for s in placed if zone_of.get(s) in allowed][:copies]
    rest = sorted(
        (s for s, z in zone_of.items() if z in allowed and s not in chosen),
        key=lambda s: _score(volume, index, s),
        reverse=True,
    )
    return chosen + rest[: max(0, copies - len(chosen))]
