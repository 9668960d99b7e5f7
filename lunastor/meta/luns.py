"""The LUN map as this meta instance last saw it, and the LUN assignment policy.

Assignment (docs/etcd-schema.md, "LUN assignment"): the lowest-numbered target that has a free
LUN, and in it the lowest free LUN in 1..255 (LUN 0 is never assigned). Targets 0..4095.

The map here is only a hint. It is loaded at start, adds the LUNs this instance creates and
drops the ones it deletes (`forget`, once the delete is committed). Deletions by other meta
instances are followed by a deletes-only watch on `Keys.LUNS` (most writes there are ACL
changes, every publish and unpublish, which cannot change which LUNs are in use), but only
from the moment another instance is live: alone (the usual deployment), every deletion is this
instance's own, and reading each one back from a watch cost meta ~9% of its CPU under
create/delete churn (one gRPC stream message per deletion). Another instance registers its
live record (`Keys.LIVE_META`) before it serves; when one appears the map is read again at
that moment and followed from there on, for the rest of this process's life. LUNs created by
other meta instances are learnt when a create trips over one: what makes a LUN unique is the
create transaction's `version(lun key) == 0` compare, and when it fails the same transaction
has read the target's whole LUN map (`learn`), so one failed attempt per target teaches all of
it. Within one instance, `reserve` also keeps concurrent requests from picking the same LUN
before etcd answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

from lunastor.common.etcd import Etcd, EventType, WatchResync
from lunastor.common.logs import get_logger
from lunastor.common.records import FIRST_LUN, MAX_LUN, MAX_TARGETS, Keys

LUNS_PER_TARGET = MAX_LUN - FIRST_LUN + 1

log = get_logger(component="lun-map")


def next_free(
    used: dict[int, set[int]],
    avoid: set[tuple[int, int]] = frozenset(),  # type: ignore[assignment]
) -> tuple[int, int] | None:
    """The (target, lun) the policy assigns next, or None when every target is full. Pure."""
    for target in range(MAX_TARGETS):
        taken = used.get(target)
        if taken is not None and len(taken) >= LUNS_PER_TARGET:
            continue
        for lun in range(FIRST_LUN, MAX_LUN + 1):
            if (taken is None or lun not in taken) and (target, lun) not in avoid:
                return target, lun
    return None


class LunMap:
    def __init__(self, etcd: Etcd, instance_id: str | None = None) -> None:
        """`instance_id`: this meta instance's id under `Keys.LIVE_META`, to follow other
        instances' deletions only while there are others; None: always follow them."""
        self.etcd = etcd
        self.instance_id = instance_id
        self.used: dict[int, set[int]] = defaultdict(set)
        self.revision = 0
        self._reserved: set[tuple[int, int]] = set()
        self._task: asyncio.Task[None] | None = None
        self.events = 0  # watch items received (tests: the watch carries deletions only)
        self.following = False  # the deletions watch is on (another instance was seen)

    async def start(self) -> LunMap:
        await self._load()
        self._task = asyncio.create_task(self._follow(), name="lun-map")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _load(self) -> None:
        used: dict[int, set[int]] = defaultdict(set)
        revision = 0
        async for page in self.etcd.iter_prefix(Keys.LUNS, page_size=5000):
            for kv in page.kvs:
                self._add(used, kv.key)
            revision = page.revision
        self.used, self.revision = used, revision

    @staticmethod
    def _add(used: dict[int, set[int]], key: str) -> None:
        try:
            target, lun = Keys.parse_lun(key)
        except ValueError:
            return
        used[target].add(lun)

    async def _await_peer(self) -> None:
        """Return once a meta instance other than this one is live (at once if one is), with
        the map read again after it appeared: every deletion up to then, the peer's included."""
        while True:
            try:
                await self._first_peer()
                await self._load()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep trying; the map is a hint, etcd decides
                log.warning("lun map: watching for other meta instances failed", error=str(exc))
                await asyncio.sleep(1.0)

    async def _first_peer(self) -> None:
        own = Keys.LIVE_META + (self.instance_id or "")
        metas, rev = await self.etcd.get_prefix(Keys.LIVE_META)
        if any(kv.key != own for kv in metas):
            return
        async for item in self.etcd.watch_prefix(Keys.LIVE_META, rev + 1):
            if isinstance(item, WatchResync):
                if any(kv.key != own for kv in item.kvs):
                    return
            elif item.type is EventType.PUT and item.kv.key != own:
                return

    async def _follow(self) -> None:
        if self.instance_id is not None:
            await self._await_peer()
            log.info("another meta instance is live; following LUN deletions")
        self.following = True
        while True:
            try:
                watch = self.etcd.watch_prefix(Keys.LUNS, self.revision + 1, deletes_only=True)
                async for item in watch:
                    self.events += 1
                    if isinstance(item, WatchResync):
                        used: dict[int, set[int]] = defaultdict(set)
                        for kv in item.kvs:
                            self._add(used, kv.key)
                        self.used = used
                    elif item.type is EventType.PUT:
                        self._add(self.used, item.kv.key)
                    else:
                        with contextlib.suppress(ValueError):
                            target, lun = Keys.parse_lun(item.kv.key)
                            self.used[target].discard(lun)
                    self.revision = item.revision
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep following; the map is a hint, etcd decides
                log.warning("lun map watch failed; reloading", error=str(exc))
                await asyncio.sleep(1.0)
                with contextlib.suppress(Exception):
                    await self._load()

    def reserve(self, avoid: set[tuple[int, int]]) -> tuple[int, int] | None:
        """Pick the next free LUN and hold it for this instance until `release`."""
        choice = next_free(self.used, avoid | self._reserved)
        if choice is not None:
            self._reserved.add(choice)
        return choice

    def release(self, slot: tuple[int, int], taken: bool) -> None:
        """Done with a reservation; `taken` says the LUN is now in use (by us or another)."""
        self._reserved.discard(slot)
        if taken:
            self.used[slot[0]].add(slot[1])

    def forget(self, slot: tuple[int, int]) -> None:
        """This instance deleted the LUN `slot` (committed)."""
        self.used[slot[0]].discard(slot[1])

    def learn(self, keys: list[str]) -> None:
        """LUN keys in use, read by a create whose LUN another instance had taken. Added,
        not replacing what the map holds: a create of ours may have committed after that
        read."""
        for key in keys:
            self._add(self.used, key)

    def counts(self) -> dict[int, int]:
        """LUNs in use per target (targets with none are left out)."""
        return {t: len(luns) for t, luns in self.used.items() if luns}
