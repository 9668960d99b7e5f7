"""Which chunk server the redirector sends an initiator to: rendezvous hashing.

Every (initiator, target) pair scores each eligible server with a stable hash and goes to the
highest score (highest random weight, Thaler & Ravishankar 1996). Nothing is stored: all
redirector instances agree without talking to each other, a server that leaves moves only the
initiators it had, and a server that joins takes about 1/(N+1) of them, all from the others.
Weighted servers use the logarithmic method (Schindelhauer & Schomaker 2005): score =
weight / -ln(u), with u the hash mapped into (0, 1); with equal weights it is the plain maximum.

Pure: no I/O, no clock, hashing with xxh3-64 (never Python's `hash()`, which is salted per
process and would make redirector instances disagree).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

STATES = ("up", "draining", "down")


class ChoiceError(ValueError):
    """Bad input to `choose_chunk_server`."""


@dataclass(frozen=True)
class ServerChoice:
    """A chunk server as the redirector sees it; only "up" servers receive initiators."""

    id: str
    state: str  # "up" | "draining" | "down"
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ChoiceError(f"server id must be a non-empty string, got {self.id!r}")
        if self.state not in STATES:
            raise ChoiceError(f"server {self.id!r}: state must be one of {STATES}")
        w = self.weight
        if not isinstance(w, int | float) or isinstance(w, bool) or not math.isfinite(w) or w <= 0:
            raise ChoiceError(f"server {self.id!r}: weight must be finite and > 0, got {w!r}")


def _score(initiator_iqn: bytes, target_iqn: bytes, server: ServerChoice) -> float:
    # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
    sid = server.id.encode()
    data = b"%d:%s%d:%s%d:%s" % (
        len(initiator_iqn),
        initiator_iqn,
        len(target_iqn),
        target_iqn,
        len(sid),
        sid,
    )
    u = (xxhash.xxh3_64_intdigest(data) + 0.5) / 2.0**64  # in (0, 1)
    return server.weight / -math.log(u)


def choose_chunk_server(
    initiator_iqn: str, target_iqn: str, servers: Sequence[ServerChoice]
) -> str | None:
    """The id of the server for this initiator and target, or None if no server is up.

    Raises ChoiceError on duplicate server ids or non-string IQNs.
    """
    if not isinstance(initiator_iqn, str) or not isinstance(target_iqn, str):
        raise ChoiceError("initiator and target IQNs must be strings")
    servers = tuple(servers)  # iterated twice below; a generator would come back empty
    seen: set[str] = set()
    for s in servers:
        if not isinstance(s, ServerChoice):
            raise ChoiceError(f"expected a ServerChoice, got {type(s).__name__}")
        if s.id in seen:
            raise ChoiceError(f"server id {s.id!r} appears more than once")
        seen.add(s.id)
    ini, tgt = initiator_iqn.encode(), target_iqn.encode()
    best: tuple[float, str] | None = None
    for s in servers:
        if s.state != "up":
            continue
        key = (_score(ini, tgt, s), s.id)  # ties (astronomically rare) go to the larger id
        if best is None or key > best:
            best = key
    return best[1] if best is not None else None
