"""Fencing stale writes by nexus epoch: the primary's decision (docs/datapath.md, "Fencing
stale writes").

Every login of an I_T nexus (initiator port = IQN + ISID, target IQN) at an access point
stores a new epoch for it in etcd (the revision of that put). Access writes carry the epoch of
the login they came through. A primary refuses a write whose epoch is older than the newest it
knows for its nexus: the newest it has accepted or seen forwarded (`seen`), or the newest its
etcd cache holds (`known`, which covers a primary that restarted and forgot what it saw).

Pure state, no IO: `EpochTable.admit` is called under the extent's lock, just before the
write is given its `seq`, so "refused" and "ordered before the newer write" are exclusive.
"""

from __future__ import annotations

from collections.abc import Callable

from lunastor.chunk.wire.messages import Nexus


class Fenced(Exception):
    """An access write from a login older than the newest known login of its nexus."""

    def __init__(self, nexus: Nexus, newest: int) -> None:
        super().__init__(
            f"nexus {nexus.initiator} -> {nexus.target}: epoch {nexus.epoch} superseded by {newest}"
        )
        self.nexus = nexus
        self.newest = newest


def _never_known(initiator: str, target: str) -> int | None:
    return None


class EpochTable:
    """The newest epoch per nexus that this chunk server has seen, plus what etcd knows."""

    def __init__(self, known: Callable[[str, str], int | None] = _never_known) -> None:
        self._known = known
        self._seen: dict[tuple[str, str], int] = {}

    def newest(self, initiator: str, target: str) -> int | None:
        seen = self._seen.get((initiator, target))
        known = self._known(initiator, target)
        if seen is None:
            return known
        return seen if known is None else max(seen, known)

    def admit(self, nexus: Nexus) -> None:
        """Accept `nexus.epoch` (and remember it) or raise `Fenced`."""
        newest = self.newest(nexus.initiator, nexus.target)
        if newest is not None and nexus.epoch < newest:
            raise Fenced(nexus, newest)
        self._seen[(nexus.initiator, nexus.target)] = nexus.epoch

    def note(self, nexus: Nexus) -> None:
        """Remember an epoch a primary accepted (carried on a forwarded write): if this
        secondary becomes the primary, it refuses the older logins too."""
        key = (nexus.initiator, nexus.target)
        if nexus.epoch > self._seen.get(key, -1):
            self._seen[key] = nexus.epoch

    def __len__(self) -> int:
        return len(self._seen)


__all__ = ["EpochTable", "Fenced"]
