"""Moving the extent map from one key per extent into pages (docs/scale.md, "Migration").

A cluster written before pages keeps working as it is: every reader reads both layouts, and
the first change of an old-layout extent moves it into its page (common/extent_pages.py).
This planner, run by the planner leader, moves the rest: per pass at most `batch` extents, a
few per transaction (each transaction holds only if those extents are unchanged, and leaves
the `MOVED` marker at their old keys), so that it never competes hard with the data path.
"""

from __future__ import annotations

from itertools import groupby

from lunastor.common.etcd import Etcd
from lunastor.common.extent_pages import Change, commit, decode_kv, page_key, parse_page_key
from lunastor.common.logs import get_logger
from lunastor.common.records import Keys

log = get_logger(component="extent-migration")

RESCAN = 100  # passes to skip after one that found nothing of the old layout
PER_TXN = 16  # extents per transaction: their markers, one page, up to 3 shards each (< 128)
BATCH = 1024  # extents per pass


class ExtentMigrator:
    name = "extent-migration"

    def __init__(self, etcd: Etcd, batch: int = BATCH) -> None:
        self.etcd = etcd
        self.batch = batch
        self._skip = 0  # passes left to skip: the last full scan found nothing to move

    async def run_once(self) -> None:
        await self.migrate_once()

    async def migrate_once(self) -> int:
        """One pass: how many extents it moved into pages."""
        if self._skip:
            self._skip -= 1
            return 0
        old: list[Change] = []
        async for page in self.etcd.iter_prefix(Keys.EXTENTS):
            for kv in page.kvs:
                if parse_page_key(kv.key) is not None:
                    continue
                for rec, stamp in decode_kv(kv.key, kv.value, kv.mod_revision):
                    old.append(Change(rec.volume, rec.index, stamp, rec))
            if len(old) >= self.batch:
                break
        moved = 0
        for _, group in groupby(old[: self.batch], key=lambda c: page_key(c.volume, c.index)):
            changes = list(group)
            for at in range(0, len(changes), PER_TXN):
                part = changes[at : at + PER_TXN]
                if await commit(self.etcd, part) is not None:
                    moved += len(part)
        if moved:
            log.info("extents moved into pages", count=moved, seen=len(old))
        self._skip = RESCAN if not old else 0
        return moved
