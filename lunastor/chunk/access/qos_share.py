"""One volume's QoS limits shared by every access point serving it (docs/qos.md, "Several
access points").

Every `PERIOD` each chunk server looks at the limited volumes it served IO for recently and,
for each, publishes its **demand** under a key bound to its chunk lease,
`/v1/live/qos-demand/<volume>/<chunk>`: the fraction of the volume's limits it used in the
last period (`used`, the largest over the limited rates) and whether its commands had to wait
(`throttled`). It then reads the volume's other demand keys and takes its share of the limits
(`shares`, the same pure function on every access point, so they agree):

- an access point that was not throttled gets what it used plus `HEADROOM`, so it can grow;
- the rest of the limit is split evenly among those that were throttled (each at least
  `FLOOR`), or evenly among all when nobody was;
- shares add up to 1 (at most `FLOOR` more for one period: an access point that gets the
  volume while others already share it starts at `FLOOR` until it has published).

An idle access point publishes at its first command (not a period later), so that access
points starting together split the limits from the start. An access point that stops serving
the volume deletes its key after `IDLE` seconds without IO;
a dead one's key goes with its lease. With one access point the share is 1: exactly the
single-access-point limiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from lunastor.chunk.access.qos import Limiter
from lunastor.common.etcd import Etcd
from lunastor.common.qos import RATES, QosLimits
from lunastor.common.records import Keys

log = logging.getLogger(__name__)

PERIOD = 0.5  # seconds between demand updates
IDLE = 2.0  # seconds without IO after which an access point withdraws its demand
HEADROOM = 1.25  # an unthrottled access point gets what it used times this
FLOOR = 0.05  # the least share of an access point with demand
WAKE_RECHECK = 0.1  # seconds after waking up: look at the others' demand again


def demand_prefix(volume_id: str) -> str:
    return f"{Keys.LIVE_QOS_DEMAND}{volume_id}/"


@dataclass(frozen=True)
class Demand:
    used: float  # fraction of the volume's limits used in the last period (largest rate)
    throttled: bool  # its commands waited for the limiter


def shares(demands: dict[str, Demand]) -> dict[str, float]:
    """Each access point's share of the volume's limits (a pure function of all demands)."""
    if not demands:
        return {}
    if len(demands) == 1:
        return dict.fromkeys(demands, 1.0)
    free = [k for k, d in demands.items() if not d.throttled]
    tight = [k for k, d in demands.items() if d.throttled]
    out = {k: max(FLOOR, demands[k].used * HEADROOM) for k in free}
    room = 1.0 - FLOOR * len(tight)
    given = sum(out.values())
    if given > room:  # the unthrottled ones' headroom does not fit: scale it down
        out = {k: max(FLOOR, v * room / given) for k, v in out.items()}
        given = sum(out.values())
    rest = max(0.0, 1.0 - given)
    if tight:
        for k in tight:
            out[k] = max(FLOOR, rest / len(tight))
    else:
        for k in out:
            out[k] += rest / len(out)
    return out


def used_fraction(limits: QosLimits, ops: dict[str, tuple[int, int]], seconds: float) -> float:
    """The largest fraction of a limited rate that `ops` ({op: (commands, bytes)} in
    `seconds`) used."""
    best = 0.0
    for rate in RATES:
        limit = getattr(limits, rate)
        if not limit:
            continue
        which = [op for op in ("read", "write") if not rate.startswith(("read_", "write_"))]
        which = which or [rate.split("_", 1)[0]]
        amount = sum(ops[op][1 if rate.endswith("bps") else 0] for op in which)
        best = max(best, amount / seconds / limit)
    return best


@dataclass
class _Tracked:
    limiter: Limiter
    ops: dict[str, tuple[int, int]]  # counters at the last period
    throttled: int
    last_io: float
    published: bool = False


class QosCoordinator:
    """Publishes this access point's demand for each limited volume and sets its limiters'
    shares from every access point's demand."""

    def __init__(
        self,
        etcd: Etcd,
        chunk_id: str,
        lease: Callable[[], tuple[int, float]],
        *,
        period: float = PERIOD,
    ) -> None:
        self.etcd = etcd
        self.chunk_id = chunk_id
        self.lease = lease
        self.period = period
        self._tracked: dict[str, _Tracked] = {}
        self._task: asyncio.Task[None] | None = None

    def track(self, volume_id: str, limiter: Limiter | None) -> None:
        """`apply_limits`'s `on_change`: a volume got a limiter here (or lost it)."""
        old = self._tracked.pop(volume_id, None)
        if limiter is not None:
            self._tracked[volume_id] = _Tracked(limiter, limiter.counts(), limiter.throttled, 0.0)
            limiter.idle = True
            limiter.on_active = lambda: self._wake(volume_id)
            asyncio.get_running_loop().create_task(self._join(volume_id, limiter))
        elif old is not None and old.published:
            asyncio.get_running_loop().create_task(self._withdraw(volume_id))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="qos shares")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.period)
            now = time.monotonic()
            try:
                await self.run_once(now - last)
            except Exception:  # etcd trouble: keep the shares we have, try again
                log.exception("updating QoS shares failed")
            last = now

    async def run_once(self, seconds: float) -> None:
        now = time.monotonic()
        for volume_id, t in list(self._tracked.items()):
            counts = t.limiter.counts()
            delta = {
                op: (counts[op][0] - t.ops[op][0], counts[op][1] - t.ops[op][1]) for op in counts
            }
            throttled = t.limiter.throttled > t.throttled or t.limiter.waiting() > 0
            t.ops, t.throttled = counts, t.limiter.throttled
            if any(n for n, _ in delta.values()) or throttled:
                t.last_io = now
            if now - t.last_io > IDLE:
                # the share stays: a volume used again here re-publishes within a period
                t.limiter.idle = True
                if t.published:
                    t.published = False
                    await self._withdraw(volume_id)
                continue
            mine = Demand(used_fraction(t.limiter.limits, delta, max(seconds, 1e-3)), throttled)
            await self._publish(volume_id, t, mine)

    async def _publish(self, volume_id: str, t: _Tracked, mine: Demand) -> None:
        lease, _ = self.lease()
        key = demand_prefix(volume_id) + self.chunk_id
        if lease:
            body = {"v": 1, "used": round(mine.used, 4), "throttled": mine.throttled}
            await self.etcd.put(key, json.dumps(body).encode(), lease=lease)
            t.published = True
        kvs, _ = await self.etcd.get_prefix(demand_prefix(volume_id))
        demands = {self.chunk_id: mine}
        for kv in kvs:
            other = kv.key.removeprefix(demand_prefix(volume_id))
            if other == self.chunk_id:
                continue
            try:
                raw = json.loads(kv.value)
                demands[other] = Demand(float(raw["used"]), bool(raw["throttled"]))
            except (ValueError, KeyError, TypeError):
                continue
        share = shares(demands)[self.chunk_id]
        if abs(share - t.limiter.share) > 1e-3:
            t.limiter.configure(t.limiter.limits, share)

    def _wake(self, volume_id: str) -> None:
        """The first command on an idle limited volume: publish at once (not a period
        later), so that access points starting together split the limits from the start."""
        t = self._tracked.get(volume_id)
        if t is not None:
            t.last_io = time.monotonic()
            asyncio.get_running_loop().create_task(self._publish_quietly(volume_id, t))

    async def _publish_quietly(self, volume_id: str, t: _Tracked) -> None:
        try:
            await self._publish(volume_id, t, Demand(0.0, False))
            # once more soon: an access point that woke at the same moment is seen now
            await asyncio.sleep(WAKE_RECHECK)
            if self._tracked.get(volume_id) is t:
                await self._publish(volume_id, t, Demand(0.0, False))
        except Exception:
            log.warning("publishing the QoS demand of %s failed", volume_id, exc_info=True)

    async def _join(self, volume_id: str, limiter: Limiter) -> None:
        """A volume just got a limiter here: if other access points already share its
        limits, start at `FLOOR` (not at the whole limit) until the first period."""
        try:
            kvs, _ = await self.etcd.get_prefix(demand_prefix(volume_id))
        except Exception:
            log.warning("reading the QoS demand of %s failed", volume_id, exc_info=True)
            return
        mine = demand_prefix(volume_id) + self.chunk_id
        if any(kv.key != mine for kv in kvs) and limiter.share == 1.0:
            limiter.configure(limiter.limits, FLOOR)

    async def _withdraw(self, volume_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.etcd.delete(demand_prefix(volume_id) + self.chunk_id)
