"""A clone honours its own zones (CSI topology) in a real dev cluster: its first write copies
the source's extent locally on the source's servers (docs/snapshots.md), in zones the clone
may not use; meta's rebalance planner then moves each such replica into the clone's zones
(join, then retire: meta/rebalance_plan.py), and the data stays intact.

The clone is written through the portal of the third zone's chunk server, not the VIP: an
access point in the clone's zone would claim the extent (locality, chunk
maintenance/locality_plan.py) and pull it into that zone by itself, which hides whether the
zones alone are honoured (they were not before the planner's zone pass). And two extents
of a 1-replica volume are written in each of the other two zones, so that the servers are
balanced as whole replicas allow with the clone's copy in zone1 (3 extents there: the
source's, its copy preserved for the clone, the clone's; 2 and 2 elsewhere): no balance move
would move the clone either (the planner's balance loop did, by chance, when zone1 held 3 of
5)."""

from __future__ import annotations

import subprocess
import time
from typing import Any

from lunastor.csi import csi_pb2 as pb
from lunastor.csi.client import CsiClient
from lunastor.csi.requests import ZONE_KEY
from tests.csi.conftest import QEMU_IQN, block_cap, qemu_io, unique
from tests.csi.test_controller import MiB, api, create, extent_records

SETTLE = 120.0  # seconds for the planner (5 s passes) to hand out, join and retire


def only(zone: str) -> pb.TopologyRequirement:
    return pb.TopologyRequirement(requisite=[pb.Topology(segments={ZONE_KEY: zone})])


async def publish(csi: CsiClient, volume_id: str) -> str:
    ctx = (
        await csi.call(
            "ControllerPublishVolume",
            pb.ControllerPublishVolumeRequest(
                volume_id=volume_id, node_id=QEMU_IQN, volume_capability=block_cap()
            ),
        )
    ).publish_context
    return f"iscsi://{ctx['portal']}/{ctx['targetIqn']}/{ctx['lun']}"


def read_verify(url: str, pattern: int, offset: str, length: str) -> None:
    proc = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", f"read -P {pattern:#x} {offset} {length}", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and "verification failed" not in proc.stdout, proc.stdout


async def test_a_clone_in_another_zone_ends_with_every_replica_in_its_zone(
    csi: CsiClient, cluster: dict[str, Any]
) -> None:
    servers = api(cluster, "GET", "/v1/cluster")["chunk_servers"]
    zone_of = {c["id"]: c["zone"] for c in servers}
    elsewhere = next(c["portal"] for c in servers if c["zone"] == "zone3")
    one = {"replicas": "1"}
    fillers = []
    for zone in ("zone2", "zone3"):
        filler = await create(
            csi, unique("zfill"), 128 * MiB, parameters=one, accessibility_requirements=only(zone)
        )
        fillers.append(filler.volume.volume_id)
        filled = await publish(csi, fillers[-1])
        qemu_io(filled, "write -P 0x33 0 1M")  # 64 MiB extents: two of them
        qemu_io(filled, "write -P 0x33 64M 1M")
    src = await create(
        csi, unique("zsrc"), 8 * MiB, parameters=one, accessibility_requirements=only("zone1")
    )
    src_id = src.volume.volume_id
    qemu_io(await publish(csi, src_id), "write -P 0x11 0 4M")
    await csi.call(
        "ControllerUnpublishVolume", pb.ControllerUnpublishVolumeRequest(volume_id=src_id)
    )
    source = pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=src_id))
    clone = await create(
        csi,
        unique("zclone"),
        8 * MiB,
        parameters=one,
        accessibility_requirements=only("zone2"),
        volume_content_source=source,
    )
    clone_id = clone.volume.volume_id
    assert [dict(t.segments) for t in clone.volume.accessible_topology] == [{ZONE_KEY: "zone2"}]
    vip = await publish(csi, clone_id)
    url = f"iscsi://{elsewhere}/{vip.split('/', 3)[3]}"  # zone3's own portal
    qemu_io(url, "write -P 0x22 0 1M")  # the clone's first write: a copy on zone1's server
    deadline = time.monotonic() + SETTLE
    first: list[set[str]] | None = None
    while True:
        extents = await extent_records(cluster, clone_id)
        placed = [{zone_of[r] for r in e.replicas} for e in extents]
        if first is None:
            first = placed
            assert {"zone1"} in placed, placed  # where the source's data was copied
        if extents and all(p == {"zone2"} for p in placed):
            break
        assert time.monotonic() < deadline, f"clone extents still in {placed}"
        time.sleep(1)
    print(f"clone moved into zone2 in {SETTLE - (deadline - time.monotonic()):.0f} s")
    read_verify(url, 0x22, "0", "1M")  # its own write
    read_verify(url, 0x11, "1M", "3M")  # what it copied from its source
    read_verify(url, 0x00, "4M", "4M")
    await csi.call(
        "ControllerUnpublishVolume", pb.ControllerUnpublishVolumeRequest(volume_id=clone_id)
    )
    for vid in (clone_id, src_id, *fillers):
        if vid in fillers:
            await csi.call(
                "ControllerUnpublishVolume", pb.ControllerUnpublishVolumeRequest(volume_id=vid)
            )
        await csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vid))
