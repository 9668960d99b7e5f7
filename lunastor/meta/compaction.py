"""etcd's key history compacted to the last `etcd_history` seconds (a planner: one meta
instance does it).

etcd keeps every revision of every key until someone compacts it. Every write of the cluster
adds one (extent pages on each generation change, volumes, LUNs, leases' records, events), so
without compaction its database only grows, ranges walk ever more history (docs/scale.md,
"Listing": a 10,000-volume listing after the control-plane bench's churn cost etcd ~80 ms of
CPU against ~57 ms once compacted), and at its space quota etcd refuses every write, the
cluster's metadata with them. kube-apiserver compacts its etcd every 5 minutes for the same
reason; we keep the same: the revisions of the last `keep` seconds stay readable (a listing's
`next` token pins one: older ones answer 410 `token_expired`, docs/operations.md), watches
that fall further behind re-list (`WatchResync`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from prometheus_client import Counter

from lunastor.common.etcd import Etcd, EtcdCompacted
from lunastor.common.logs import get_logger

log = get_logger(component="compaction")

COMPACTIONS = Counter("lunastor_etcd_compactions_total", "etcd history compactions meta made")


def compaction_target(seen: deque[tuple[float, int]], now: float, keep: float) -> int | None:
    """The newest revision `seen` (oldest first: (time, revision)) at least `keep` seconds
    before `now`, dropped from `seen` with every older one; None when there is none."""
    target = None
    while seen and now - seen[0][0] >= keep:
        target = seen.popleft()[1]
    return target


class HistoryCompactor:
    """Each pass notes etcd's current revision; it compacts to the newest revision noted at
    least `keep` seconds ago. A new leader starts with no notes: its first compaction comes
    `keep` seconds after it took over, never earlier than that history."""

    name = "compaction"

    def __init__(
        self, etcd: Etcd, keep: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.etcd = etcd
        self.keep = keep
        self.clock = clock
        self._seen: deque[tuple[float, int]] = deque()
        self._compacted = 0

    async def run_once(self) -> None:
        now = self.clock()
        self._seen.append((now, await self.etcd.revision()))
        target = compaction_target(self._seen, now, self.keep)
        if target is None or target <= self._compacted:
            return
        try:
            await self.etcd.compact(target)
        except EtcdCompacted:
            pass  # compacted further already (an operator, etcd's own auto-compaction)
        else:
            COMPACTIONS.inc()
            log.info("etcd history compacted", revision=target, keep=self.keep)
        self._compacted = target
