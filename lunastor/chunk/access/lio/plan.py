"""What LIO should hold, computed from the LUN map lunastor serves (pure; `rtsconfig` applies it).

One `user:` (TCMU) backstore per exported volume, named `lunastor-<volume id>` with the handler
configuration `lunastor/<volume id>`; one iSCSI target per lunastor target (the same IQN), TPG 1
with the configured portals; one LIO LUN per LUN-map entry (the same LUN number); one node ACL
per initiator named in any of the target's LUN ACLs, mapping exactly the LUNs that name it
(LIO's mapped LUN = the LUN number). With CHAP set on the target, every ACL carries its
user/secret (and mutual user/secret) and the TPG requires authentication. Discovery CHAP
becomes the iSCSI fabric's discovery_auth (fabric-wide in LIO: it also guards SendTargets for
targets that are not lunastor's).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lunastor.iscsi.chap import ChapCredentials

BACKSTORE_PREFIX = "lunastor-"
HANDLER = "lunastor"  # the subtype in the TCMU config string
_SAFE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class PlanError(Exception):
    """A record that LIO cannot represent (the volume is then not exported through LIO)."""


@dataclass(frozen=True)
class Backstore:
    name: str
    config: str  # the TCMU dev_config: "lunastor/<volume id>"
    volume_id: str
    size: int
    block_size: int


@dataclass(frozen=True)
class Acl:
    initiator: str
    luns: tuple[int, ...]
    chap: ChapCredentials | None = None


@dataclass(frozen=True)
class TargetPlan:
    iqn: str
    luns: dict[int, str]  # LUN -> backstore name
    acls: tuple[Acl, ...]
    authentication: bool  # CHAP required at login


@dataclass(frozen=True)
class LioPlan:
    portals: tuple[tuple[str, int], ...]
    backstores: dict[str, Backstore] = field(default_factory=dict)
    targets: dict[str, TargetPlan] = field(default_factory=dict)
    problems: tuple[str, ...] = ()  # what could not be exported, one line each
    discovery: ChapCredentials | None = None  # SendTargets CHAP (LIO: fabric-wide)


@dataclass(frozen=True)
class LunExport:
    """One LUN-map entry as the planner needs it (`EtcdTargetHost.exported()` supplies it)."""

    target_iqn: str
    lun: int
    volume_id: str
    size: int
    block_size: int
    initiators: frozenset[str]


def backstore_for(volume_id: str, size: int, block_size: int) -> Backstore:
    if not _SAFE.match(volume_id):
        raise PlanError(f"volume id {volume_id!r} cannot name a LIO backstore")
    if block_size not in (512, 1024, 2048, 4096):
        raise PlanError(f"volume {volume_id}: block size {block_size} is not one LIO accepts")
    if size < block_size:
        raise PlanError(f"volume {volume_id}: size {size} is less than one block")
    return Backstore(
        f"{BACKSTORE_PREFIX}{volume_id}", f"{HANDLER}/{volume_id}", volume_id, size, block_size
    )


def plan(
    exports: Sequence[LunExport],
    chap: Callable[[str], ChapCredentials | None],
    portals: Sequence[tuple[str, int]],
    discovery: ChapCredentials | None = None,
) -> LioPlan:
    """The LIO configuration serving `exports`, with `chap(target_iqn)` per target and
    `discovery` for SendTargets sessions."""
    backstores: dict[str, Backstore] = {}
    luns: dict[str, dict[int, str]] = {}
    acl_luns: dict[str, dict[str, list[int]]] = {}
    problems = []
    for e in exports:
        try:
            store = backstore_for(e.volume_id, e.size, e.block_size)
        except PlanError as exc:
            problems.append(str(exc))
            continue
        backstores[store.name] = store
        luns.setdefault(e.target_iqn, {})[e.lun] = store.name
        per_target = acl_luns.setdefault(e.target_iqn, {})
        for initiator in e.initiators:
            per_target.setdefault(initiator, []).append(e.lun)
    targets = {}
    for iqn, table in luns.items():
        credentials = chap(iqn)
        acls = tuple(
            Acl(initiator, tuple(sorted(numbers)), credentials)
            for initiator, numbers in sorted(acl_luns[iqn].items())
        )
        targets[iqn] = TargetPlan(iqn, dict(sorted(table.items())), acls, credentials is not None)
    return LioPlan(tuple(portals), backstores, targets, tuple(problems), discovery)
