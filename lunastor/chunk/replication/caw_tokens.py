"""The `caw` tokens a chunk server's replicas applied (docs/data-protocol.md, "Handling repeat
calls").

A COMPARE AND WRITE retried after it was applied (its answer lost with a dying primary, or
`unavailable` after it applied) must be answered `ok`, not compared again: compared with its
own new data it would miscompare. The primary applies it and forwards it as a plain `write`
carrying the token, so every member that applied it knows the token, and a member that
becomes primary after a failover (the most advanced survivor: one that applied it, if any
did) answers the retry from here.

Memory only: a restarted server has forgotten its tokens (a retry is then compared again,
as before). An extent's tokens are forgotten when its replica is rewritten from another
member (a copy, a convergence, a new replica): what it holds is then no longer what it
applied itself.
"""

from __future__ import annotations

from collections import OrderedDict

PER_EXTENT = 256  # tokens remembered per extent, the newest
EXTENTS = 4096  # extents remembered, the most recently used


class CawTokens:
    def __init__(self, per_extent: int = PER_EXTENT, extents: int = EXTENTS) -> None:
        self.per_extent = per_extent
        self.extents = extents
        self._seqs: OrderedDict[tuple[str, int], dict[int, int]] = OrderedDict()

    def note(self, volume: str, index: int, token: int, seq: int) -> None:
        """Our replica of the extent applied the `caw` named `token` as `seq`."""
        key = (volume, index)
        seqs = self._seqs.get(key)
        if seqs is None:
            seqs = self._seqs[key] = {}
            if len(self._seqs) > self.extents:
                self._seqs.popitem(last=False)
        else:
            self._seqs.move_to_end(key)
        if len(seqs) >= self.per_extent:
            del seqs[next(iter(seqs))]
        seqs[token] = seq

    def seq(self, volume: str, index: int, token: int) -> int | None:
        """The seq our replica applied the `caw` named `token` as, None if unknown."""
        seqs = self._seqs.get((volume, index))
        return None if seqs is None else seqs.get(token)

    def forget(self, volume: str, index: int) -> None:
        """Our replica of the extent is rewritten from another member."""
        self._seqs.pop((volume, index), None)
