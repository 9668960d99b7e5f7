"""`GET /v1/volumes/{id}/condition`: is a volume healthy, from the cluster's side?

Computed from its extent map and the live chunk servers, read at one etcd revision (CSI
ControllerGetVolume / ListVolumes `volume_condition`; docs/csi.md):

- unavailable: an extent none of whose replicas is on a live chunk server (IO to it fails
  until one comes back);
- under-replicated: an extent with fewer live replicas than the volume keeps (re-replication
  restores them in the background);
- rebuilding: an extent whose replicas are being made identical after a failure
  (`converging`: its primary takes no writes until that is done).

A volume with no extents yet (nothing written: thin) is healthy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web

from lunastor.common.records import ChunkServerStatus, ExtentRecord, Keys, RecordError
from lunastor.meta.context import ETCD_KEY, STORE_KEY
from lunastor.meta.routing import ALL_ROLES, Call, Route, json_response
from lunastor.meta.volumes import VOLUME_ID


def volume_condition(
    extents: Iterable[ExtentRecord], live: set[str], replicas: int
) -> dict[str, Any]:
    """The condition of a volume whose extents are `extents`, `live` being the ids of the
    live chunk servers and `replicas` the copies the volume keeps. Pure: table-tested."""
    unavailable = under = converging = total = 0
    worst = replicas
    for e in extents:
        total += 1
        wanted = min(e.copies or replicas, replicas)
        alive = sum(1 for r in e.replicas if r in live)
        if alive == 0:
            unavailable += 1
        elif alive < wanted:
            under += 1
            worst = min(worst, alive)
        if e.converging:
            converging += 1
    problems = []
    if unavailable:
        problems.append(f"unavailable: {unavailable} of {total} extents have no live replica")
    if under:
        problems.append(
            f"under-replicated: {under} of {total} extents below {replicas} copies "
            f"(fewest live: {worst}); re-replication is restoring them"
        )
    if converging:
        problems.append(f"rebuilding: {converging} extents being made identical after a failure")
    return {
        "abnormal": bool(problems),
        "message": "; ".join(problems) or f"healthy: {total} extents, all with {replicas} copies",
        "extents": total,
        "unavailable_extents": unavailable,
        "under_replicated_extents": under,
        "rebuilding_extents": converging,
    }


async def get_condition(call: Call) -> web.Response:
    volume_id = call.params["volume_id"]
    volume = await call.app[STORE_KEY].get_volume(volume_id)
    etcd = call.app[ETCD_KEY]
    kvs, rev = await etcd.get_prefix(Keys.volume_extents(volume_id))
    lives, _ = await etcd.get_prefix(Keys.LIVE_CHUNKS, revision=rev)
    live = set()
    for kv in lives:
        try:
            live.add(ChunkServerStatus.from_json(kv.value).id)
        except RecordError:
            continue
    extents = [ExtentRecord.from_json(kv.value) for kv in kvs]
    return json_response(volume_condition(extents, live, volume.replicas))


ROUTES = [
    Route(
        "GET",
        "/v1/volumes/{volume_id}/condition",
        get_condition,
        "getVolumeCondition",
        "Whether the volume is healthy: unavailable, under-replicated or rebuilding extents "
        "(CSI volume_condition)",
        "volumes",
        ALL_ROLES,
        params=(VOLUME_ID,),
        responses={200: "VolumeCondition"},
    ),
]
