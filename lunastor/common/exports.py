"""What initiators may see: a read model of the LUN map, target CHAP and discovery CHAP.

Chunk servers (login, LUN masking) and the redirector (discovery, redirects) answer the same
questions from the same records, which meta writes (docs/etcd-schema.md):

- `/v1/luns/<target>/<lun>`: `LunRecord`, the volume and the initiators it is published to;
- `/v1/targets/<target>`: `TargetRecord`, the target's CHAP (sealed secrets) or none;
- `/v1/discovery-chap`: `ChapRecord` for discovery sessions, absent when off.

`ExportIndex` is pure: built from (key, value) pairs, it answers lookups with no I/O, so it is
table-tested on its own. `Exports` keeps three `PrefixCache`s current and rebuilds the index
when one of them moved on (at the next lookup, not per event: a burst of publishes costs one
rebuild). Every lookup is a dictionary access, cheap enough for the login path.

A target exists for an initiator only through its LUNs: a target with no LUN published to
anybody is "not found", one whose LUNs are all published to others is "not authorized".
Records that do not decode are left out (and counted in `bad_records`) instead of failing
every lookup; a CHAP secret that cannot be unsealed (no key configured, another key, tampered)
is not "no CHAP": lookups of it raise `SecretUnavailable`, so logins fail closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lunastor.common.etcd import Etcd, PrefixCache
from lunastor.common.etcd.cache import catch_up_all
from lunastor.common.records import (
    MAX_TARGETS,
    TARGET_IQN_PREFIX,
    ChapRecord,
    Keys,
    LunRecord,
    RecordError,
    TargetRecord,
    target_iqn,
)
from lunastor.common.sealing import Sealer, SealError

log = logging.getLogger(__name__)


class ExportsError(Exception):
    """Base of the read model's errors."""


class SecretUnavailable(ExportsError):
    """CHAP is configured but its secret cannot be opened here; the message says why."""


@dataclass(frozen=True)
class ChapSecrets:
    """Plain CHAP credentials for one target or for discovery (never logged: see repr)."""

    user: str
    secret: bytes
    mutual_user: str | None = None
    mutual_secret: bytes | None = None

    def __repr__(self) -> str:
        return f"ChapSecrets(user={self.user!r}, mutual={self.mutual_secret is not None})"


def parse_target_iqn(iqn: str) -> int | None:
    """The target number of one of our target IQNs, or None if `iqn` is not one."""
    if not iqn.startswith(TARGET_IQN_PREFIX):
        return None
    digits = iqn[len(TARGET_IQN_PREFIX) :]
    if not digits.isascii() or not digits.isdigit() or (len(digits) > 1 and digits[0] == "0"):
        return None
    number = int(digits)
    return number if number < MAX_TARGETS else None


@dataclass
class _Chap:
    """A CHAP record as stored (sealed), or the reason it is unusable."""

    record: ChapRecord | None
    error: str = ""


def _open_chap(chap: _Chap, sealer: Sealer | None, what: str) -> ChapSecrets:
    if chap.record is None:
        raise SecretUnavailable(f"{what}: {chap.error}")
    if sealer is None:
        raise SecretUnavailable(f"{what}: CHAP is set but no secret_key is configured")
    rec = chap.record
    try:
        secret = sealer.open(rec.secret).encode()
        mutual = sealer.open(rec.mutual_secret).encode() if rec.mutual_secret else None
    except SealError as exc:
        raise SecretUnavailable(f"{what}: {exc}") from None
    return ChapSecrets(
        user=rec.user,
        secret=secret,
        mutual_user=(rec.mutual_user or None) if mutual is not None else None,
        mutual_secret=mutual,
    )


@dataclass
class ExportIndex:
    """Lookups over one consistent set of records. Build with `ExportIndex.build`."""

    # target number -> LUN -> (volume id, initiators)
    luns: dict[int, dict[int, tuple[str, frozenset[str]]]] = field(default_factory=dict)
    # initiator -> target numbers with at least one LUN published to it
    by_initiator: dict[str, set[int]] = field(default_factory=dict)
    target_chaps: dict[int, _Chap] = field(default_factory=dict)
    discovery: _Chap | None = None
    sealer: Sealer | None = None
    bad_records: list[str] = field(default_factory=list)  # "key: why"

    @classmethod
    def build(
        cls,
        luns: Iterable[tuple[str, bytes]],
        targets: Iterable[tuple[str, bytes]] = (),
        discovery_chap: bytes | None = None,
        sealer: Sealer | None = None,
    ) -> ExportIndex:
        """Index LUN records (`Keys.lun` keys), target records and the discovery CHAP record."""
        index = cls(sealer=sealer)
        for key, value in luns:
            try:
                target, lun = Keys.parse_lun(key)
                record = LunRecord.from_json(value)
                initiators = frozenset(_strings(record.initiators, "initiators"))
            except (ValueError, RecordError) as exc:
                index.bad_records.append(f"{key}: {exc}")
                continue
            index.luns.setdefault(target, {})[lun] = (record.volume_id, initiators)
            for initiator in initiators:
                index.by_initiator.setdefault(initiator, set()).add(target)
        for key, value in targets:
            try:
                trecord = TargetRecord.from_json(value)
                number = int(key.removeprefix(Keys.TARGETS))
            except (ValueError, RecordError) as exc:
                index.bad_records.append(f"{key}: {exc}")
                continue
            if trecord.chap is not None:
                index.target_chaps[number] = _decode_chap(trecord.chap)
        if discovery_chap is not None:
            try:
                index.discovery = _Chap(ChapRecord.from_json(discovery_chap))
            except RecordError as exc:
                index.discovery = _Chap(None, f"unreadable record: {exc}")
        return index

    # --- lookups ------------------------------------------------------------------------

    def target_exists(self, target: str) -> bool:
        """Whether `target` (an IQN) has at least one LUN, published to anybody or not."""
        number = parse_target_iqn(target)
        return number is not None and bool(self.luns.get(number))

    def visible_targets(self, initiator: str) -> list[str]:
        """The target IQNs `initiator` may see (a LUN published to it), in target order."""
        return [target_iqn(n) for n in sorted(self.by_initiator.get(initiator, ()))]

    def may_see(self, initiator: str, target: str) -> bool:
        number = parse_target_iqn(target)
        return number is not None and number in self.by_initiator.get(initiator, ())

    def visible_luns(self, initiator: str, target: str) -> dict[int, str]:
        """LUN -> volume id of the LUNs of `target` published to `initiator`."""
        number = parse_target_iqn(target)
        if number is None:
            return {}
        return {
            lun: volume
            for lun, (volume, initiators) in sorted(self.luns.get(number, {}).items())
            if initiator in initiators
        }

    def target_chap(self, target: str) -> ChapSecrets | None:
        """CHAP for logins to `target`, None when off; SecretUnavailable if it cannot be
        opened."""
        number = parse_target_iqn(target)
        chap = self.target_chaps.get(number) if number is not None else None
        return None if chap is None else _open_chap(chap, self.sealer, target)

    def discovery_chap(self) -> ChapSecrets | None:
        """CHAP for discovery sessions, None when off; SecretUnavailable if it cannot be
        opened."""
        if self.discovery is None:
            return None
        return _open_chap(self.discovery, self.sealer, "discovery CHAP")


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError(f"{what}: expected a list of strings")
    return value


def _decode_chap(raw: Any) -> _Chap:
    if not isinstance(raw, dict):
        return _Chap(None, "CHAP settings are not an object")
    try:
        return _Chap(ChapRecord.from_json(json.dumps({"v": ChapRecord.VERSION, **raw})))
    except (RecordError, TypeError, ValueError) as exc:
        return _Chap(None, f"unreadable CHAP settings: {exc}")


class Exports:
    """The live read model: `await Exports(etcd, sealer).start()`, then `exports.index`."""

    def __init__(self, etcd: Etcd, sealer: Sealer | None = None) -> None:
        self.sealer = sealer
        self.luns = PrefixCache(etcd, Keys.LUNS)
        self.targets = PrefixCache(etcd, Keys.TARGETS)
        # a prefix cache of one key: "/v1/discovery-chap" also matches longer keys, which
        # `index` ignores
        self.discovery = PrefixCache(etcd, Keys.DISCOVERY_CHAP)
        self._index = ExportIndex(sealer=sealer)
        self._built_at: tuple[int, int, int] = (-1, -1, -1)

    async def start(self) -> Exports:
        await self.luns.start()
        await self.targets.start()
        await self.discovery.start()
        return self

    async def stop(self) -> None:
        for cache in (self.luns, self.targets, self.discovery):
            await cache.stop()

    async def __aenter__(self) -> Exports:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def error(self) -> BaseException | None:
        """Why following etcd stopped for good (the index is then stale), or None."""
        return next((c.error for c in (self.luns, self.targets, self.discovery) if c.error), None)

    @property
    def revisions(self) -> tuple[int, int, int]:
        return (self.luns.revision, self.targets.revision, self.discovery.revision)

    @property
    def index(self) -> ExportIndex:
        """The index as of the caches' current revisions (rebuilt only if they moved)."""
        revisions = self.revisions
        if revisions != self._built_at:
            chap = self.discovery.get(Keys.DISCOVERY_CHAP)
            self._index = ExportIndex.build(
                _values(self.luns.items),
                _values(self.targets.items),
                chap.value if chap is not None else None,
                self.sealer,
            )
            self._built_at = revisions
            for bad in self._index.bad_records:
                log.warning("ignoring an unreadable record: %s", bad)
        return self._index

    async def catch_up(self, timeout: float) -> None:
        """Return once the index holds every record etcd holds now (`PrefixCache.catch_up`);
        TimeoutError after `timeout` seconds."""
        await catch_up_all((self.luns, self.targets, self.discovery), timeout)

    async def wait_for(self, predicate: Callable[[ExportIndex], bool], timeout: float) -> None:
        """Return once `predicate(self.index)` holds; TimeoutError after `timeout` seconds.

        (Not by revision: a cache's revision only moves with changes under its own prefix.)
        """
        async with asyncio.timeout(timeout):
            while not predicate(self.index):
                for cache in (self.luns, self.targets, self.discovery):
                    if cache.error is not None:
                        raise cache.error
                await asyncio.sleep(0.02)


def _values(items: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    return [(key, kv.value) for key, kv in items.items()]
