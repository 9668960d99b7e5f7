"""The controller plugin against a real dev cluster: every RPC, every error code of
docs/csi-mapping.md it can produce, idempotency under concurrent retries, paging and
topology. Calls go over gRPC to a real `lunastor-csi --mode controller` process."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest

from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.extent_pages import extent_records as decode_extents
from lunastor.common.records import ExtentRecord, Keys
from lunastor.csi import csi_pb2 as pb
from lunastor.csi.client import CsiClient
from lunastor.csi.requests import ZONE_KEY
from tests.csi.conftest import (
    QEMU_IQN,
    Mode,
    block_cap,
    mount_cap,
    qemu_io,
    start_plugin,
    stop_plugin,
    unique,
)
from tests.support.devcluster import lunastor

GiB = 1 << 30
MiB = 1 << 20
NODE = "iqn.2026-11.io.lunastor.test:csi-node1"
NODE2 = "iqn.2026-11.io.lunastor.test:csi-node2"
Code = grpc.StatusCode


async def fails(code: grpc.StatusCode, call: Awaitable[Any]) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return str(info.value.details())


async def create(
    csi: CsiClient, name: str, size: int = 64 * MiB, **kw: Any
) -> pb.CreateVolumeResponse:
    kw.setdefault("volume_capabilities", [mount_cap()])
    req = pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=size), **kw
    )
    return await csi.call("CreateVolume", req)


def api(cluster: dict[str, Any], method: str, path: str) -> Any:
    req = urllib.request.Request(
        cluster["api_url"] + path,
        method=method,
        headers={"Authorization": f"Bearer {cluster['admin_token']}"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


async def extent_records(cluster: dict[str, Any], volume_id: str) -> list[ExtentRecord]:
    cfg = EtcdConfig(endpoints=cluster["etcd"]["endpoints"], namespace=cluster["etcd"]["namespace"])
    async with await Etcd.connect(cfg) as etcd:
        kvs, _ = await etcd.get_prefix(Keys.volume_extents(volume_id))
    return decode_extents(kvs)


# --- identity ------------------------------------------------------------------------------------


async def test_identity_names_the_driver_and_its_capabilities(csi: CsiClient) -> None:
    info = await csi.call("GetPluginInfo", pb.GetPluginInfoRequest())
    assert info.name == "csi.lunastor.io" and info.vendor_version
    caps = await csi.call("GetPluginCapabilities", pb.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in caps.capabilities if c.HasField("service")}
    assert services == {
        pb.PluginCapability.Service.CONTROLLER_SERVICE,
        pb.PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
    }
    expansion = [
        c.volume_expansion.type for c in caps.capabilities if c.HasField("volume_expansion")
    ]
    assert expansion == [pb.PluginCapability.VolumeExpansion.ONLINE]
    probe = await csi.call("Probe", pb.ProbeRequest())
    assert probe.ready.value is True


async def test_probe_fails_with_a_token_the_api_refuses(
    cluster: dict[str, Any], tmp_path: Any
) -> None:
    plugin = start_plugin(
        tmp_path, "bad-token", f"api_url={cluster['api_url']}", "api_token=not-a-token"
    )
    client = CsiClient(plugin.endpoint)
    try:
        await fails(Code.UNAUTHENTICATED, client.call("Probe", pb.ProbeRequest()))
        await fails(Code.UNAUTHENTICATED, create(client, unique("unauth")))
    finally:
        await client.close()
        assert stop_plugin(plugin) == 0


async def test_probe_and_calls_are_unavailable_while_the_api_is_unreachable(
    tmp_path: Any,
) -> None:
    plugin = start_plugin(tmp_path, "no-api", "api_url=http://127.0.0.1:1", "api_token=t")
    client = CsiClient(plugin.endpoint)
    try:
        await fails(Code.UNAVAILABLE, client.call("Probe", pb.ProbeRequest()))
        await fails(Code.UNAVAILABLE, create(client, unique("unreachable")))
    finally:
        await client.close()
        assert stop_plugin(plugin) == 0


async def test_controller_capabilities(csi: CsiClient) -> None:
    caps = await csi.call("ControllerGetCapabilities", pb.ControllerGetCapabilitiesRequest())
    RPC = pb.ControllerServiceCapability.RPC
    got = {c.rpc.type for c in caps.capabilities}
    assert {
        RPC.CREATE_DELETE_VOLUME,
        RPC.PUBLISH_UNPUBLISH_VOLUME,
        RPC.LIST_VOLUMES,
        RPC.LIST_VOLUMES_PUBLISHED_NODES,
        RPC.GET_CAPACITY,
        RPC.CREATE_DELETE_SNAPSHOT,
        RPC.LIST_SNAPSHOTS,
        RPC.CLONE_VOLUME,
        RPC.EXPAND_VOLUME,
        RPC.VOLUME_CONDITION,
        RPC.GET_VOLUME,
        RPC.MODIFY_VOLUME,
    } <= got


# --- create / delete -----------------------------------------------------------------------------


async def test_create_rounds_up_to_the_block_size_and_is_idempotent(csi: CsiClient) -> None:
    name = unique("pvc")
    params = {"replicas": "2", "blockSize": "4096", "fsType": "xfs"}
    first = await create(csi, name, 10 * MiB + 1, parameters=params)
    vol = first.volume
    assert vol.capacity_bytes == 10 * MiB + 4096
    assert vol.volume_id.startswith("vol-")
    assert dict(vol.volume_context) == {"blockSize": "4096", "replicas": "2", "fsType": "xfs"}
    again = await create(csi, name, 10 * MiB + 1, parameters=params)
    assert again == first
    # same name, other parameters: ALREADY_EXISTS
    await fails(Code.ALREADY_EXISTS, create(csi, name, 20 * MiB, parameters=params))
    await fails(
        Code.ALREADY_EXISTS, create(csi, name, 10 * MiB + 1, parameters={**params, "replicas": "3"})
    )
    await csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    await csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vol.volume_id))  # again: OK
    await fails(
        Code.NOT_FOUND,
        csi.call("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=vol.volume_id)),
    )


async def test_names_the_api_does_not_allow_are_hashed_the_same_way_each_time(
    csi: CsiClient,
) -> None:
    name = "pvc with spaces and ünïcode " + unique("x")
    first = await create(csi, name)
    assert (await create(csi, name)).volume.volume_id == first.volume.volume_id
    await csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=first.volume.volume_id))


async def test_fifty_concurrent_creates_of_one_name_give_one_volume(
    csi: CsiClient, cluster: dict[str, Any]
) -> None:
    name = unique("race")
    answers = await asyncio.gather(*(create(csi, name) for _ in range(50)))
    assert len({a.volume.volume_id for a in answers}) == 1
    found = api(cluster, "GET", f"/v1/volumes?name={name}")
    assert [v["id"] for v in found["items"]] == [answers[0].volume.volume_id]
    # and 50 concurrent deletes of it all succeed
    vid = answers[0].volume.volume_id
    await asyncio.gather(
        *(csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vid)) for _ in range(50))
    )
    assert api(cluster, "GET", f"/v1/volumes?name={name}")["items"] == []


@pytest.mark.parametrize(
    ("request_fields", "code"),
    [
        ({"name": ""}, Code.INVALID_ARGUMENT),
        ({"name": "bad\x01name"}, Code.INVALID_ARGUMENT),
        ({"volume_capabilities": []}, Code.INVALID_ARGUMENT),
        ({"parameters": {"replicas": "9"}}, Code.INVALID_ARGUMENT),
        ({"parameters": {"colour": "blue"}}, Code.INVALID_ARGUMENT),
        ({"parameters": {"fsType": "btrfs"}}, Code.INVALID_ARGUMENT),
        ({"volume_capabilities": [mount_cap(fs_type="ntfs")]}, Code.INVALID_ARGUMENT),
        ({"volume_capabilities": [mount_cap(Mode.MULTI_NODE_MULTI_WRITER)]}, Code.INVALID_ARGUMENT),
        (
            {"volume_capabilities": [pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume())]},
            Code.INVALID_ARGUMENT,
        ),
        (
            {"capacity_range": pb.CapacityRange(required_bytes=2 * GiB, limit_bytes=GiB)},
            Code.OUT_OF_RANGE,
        ),
        (
            {"capacity_range": pb.CapacityRange(required_bytes=1000, limit_bytes=1000)},
            Code.OUT_OF_RANGE,
        ),
        ({"capacity_range": pb.CapacityRange(required_bytes=1 << 51)}, Code.OUT_OF_RANGE),
        ({"capacity_range": pb.CapacityRange(required_bytes=-1)}, Code.INVALID_ARGUMENT),
        (
            {
                "volume_content_source": pb.VolumeContentSource(
                    snapshot=pb.VolumeContentSource.SnapshotSource(
                        snapshot_id="snap-0000000000000000"
                    )
                )
            },
            Code.NOT_FOUND,
        ),
        (
            {
                "volume_content_source": pb.VolumeContentSource(
                    volume=pb.VolumeContentSource.VolumeSource(volume_id="no-such-volume")
                )
            },
            Code.NOT_FOUND,
        ),
        (
            {
                "accessibility_requirements": pb.TopologyRequirement(
                    requisite=[pb.Topology(segments={ZONE_KEY: "mars"})]
                )
            },
            Code.RESOURCE_EXHAUSTED,
        ),
        (
            {
                "accessibility_requirements": pb.TopologyRequirement(
                    requisite=[pb.Topology(segments={"region": "x"})]
                )
            },
            Code.INVALID_ARGUMENT,
        ),
    ],
)
async def test_create_refuses_bad_requests(
    csi: CsiClient, request_fields: dict[str, Any], code: grpc.StatusCode
) -> None:
    fields: dict[str, Any] = {
        "name": unique("bad"),
        "volume_capabilities": [mount_cap()],
        "capacity_range": pb.CapacityRange(required_bytes=64 * MiB),
        **request_fields,
    }
    await fails(code, csi.call("CreateVolume", pb.CreateVolumeRequest(**fields)))


async def test_delete_of_unknown_or_foreign_ids_succeeds_and_of_an_empty_id_is_refused(
    csi: CsiClient,
) -> None:
    for vid in ("vol-0123456789abcdef", "some-other-driver's-id"):
        await csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vid))
    await fails(Code.INVALID_ARGUMENT, csi.call("DeleteVolume", pb.DeleteVolumeRequest()))


# --- publish -------------------------------------------------------------------------------------


async def test_publish_answers_the_vip_target_and_lun_and_is_idempotent(
    csi: CsiClient, cluster: dict[str, Any]
) -> None:
    vid = (await create(csi, unique("pub"))).volume.volume_id
    req = pb.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=NODE, volume_capability=mount_cap()
    )
    first = await csi.call("ControllerPublishVolume", req)
    ctx = dict(first.publish_context)
    view = api(cluster, "GET", f"/v1/volumes/{vid}")
    assert ctx == {
        "portal": cluster["portal"],
        "targetIqn": view["target_iqn"],
        "lun": str(view["lun"]),
        "readonly": "false",
    }
    assert await csi.call("ControllerPublishVolume", req) == first
    # single-node access: another node is refused while it is published here
    other = pb.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=NODE2, volume_capability=mount_cap()
    )
    await fails(Code.FAILED_PRECONDITION, csi.call("ControllerPublishVolume", other))
    # read-only on many nodes is allowed
    ro = pb.ControllerPublishVolumeRequest(
        volume_id=vid,
        node_id=NODE2,
        readonly=True,
        volume_capability=mount_cap(Mode.MULTI_NODE_READER_ONLY),
    )
    assert (await csi.call("ControllerPublishVolume", ro)).publish_context["readonly"] == "true"
    got = await csi.call("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=vid))
    assert sorted(got.status.published_node_ids) == sorted([NODE, NODE2])
    # a published volume cannot be deleted
    await fails(
        Code.FAILED_PRECONDITION, csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vid))
    )
    unpub = pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE)
    await csi.call("ControllerUnpublishVolume", unpub)
    await csi.call("ControllerUnpublishVolume", unpub)  # twice: OK
    # no node_id: from every node
    await csi.call("ControllerUnpublishVolume", pb.ControllerUnpublishVolumeRequest(volume_id=vid))
    got = await csi.call("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=vid))
    assert list(got.status.published_node_ids) == []
    await csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vid))
    # unpublishing a deleted volume: NOT_FOUND (CSI: "Volume does not exist")
    await fails(Code.NOT_FOUND, csi.call("ControllerUnpublishVolume", unpub))


async def test_concurrent_publishes_of_a_single_node_volume_to_ten_nodes_let_one_win(
    csi: CsiClient,
) -> None:
    vid = (await create(csi, unique("excl"))).volume.volume_id
    nodes = [f"iqn.2026-11.io.lunastor.test:race{i}" for i in range(10)]

    async def publish(node: str) -> grpc.StatusCode:
        req = pb.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=node, volume_capability=mount_cap()
        )
        try:
            await csi.call("ControllerPublishVolume", req)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return Code.OK

    codes = await asyncio.gather(*(publish(n) for n in nodes))
    assert sorted(codes, key=lambda c: c.value) == [Code.OK] + [Code.FAILED_PRECONDITION] * 9
    got = await csi.call("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=vid))
    assert len(got.status.published_node_ids) == 1
    await csi.call("ControllerUnpublishVolume", pb.ControllerUnpublishVolumeRequest(volume_id=vid))
    await csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vid))


async def test_publish_errors(csi: CsiClient) -> None:
    vid = (await create(csi, unique("puberr"))).volume.volume_id
    cap = mount_cap()
    cases = [
        (
            pb.ControllerPublishVolumeRequest(node_id=NODE, volume_capability=cap),
            Code.INVALID_ARGUMENT,
        ),
        (
            pb.ControllerPublishVolumeRequest(volume_id=vid, volume_capability=cap),
            Code.INVALID_ARGUMENT,
        ),
        (pb.ControllerPublishVolumeRequest(volume_id=vid, node_id=NODE), Code.INVALID_ARGUMENT),
        (
            pb.ControllerPublishVolumeRequest(
                volume_id="vol-0123456789abcdef", node_id=NODE, volume_capability=cap
            ),
            Code.NOT_FOUND,
        ),
        (
            pb.ControllerPublishVolumeRequest(
                volume_id="not-ours", node_id=NODE, volume_capability=cap
            ),
            Code.NOT_FOUND,
        ),
        # a node that does not exist: node ids are initiator names
        (
            pb.ControllerPublishVolumeRequest(
                volume_id=vid, node_id="some-fake-node-id", volume_capability=cap
            ),
            Code.NOT_FOUND,
        ),
        (
            pb.ControllerPublishVolumeRequest(
                volume_id=vid, node_id="iqn.bad name", volume_capability=cap
            ),
            Code.NOT_FOUND,
        ),
        (
            pb.ControllerPublishVolumeRequest(
                volume_id=vid,
                node_id=NODE,
                volume_capability=mount_cap(Mode.MULTI_NODE_MULTI_WRITER),
            ),
            Code.INVALID_ARGUMENT,
        ),
    ]
    for req, code in cases:
        await fails(code, csi.call("ControllerPublishVolume", req))
    await fails(
        Code.INVALID_ARGUMENT,
        csi.call("ControllerUnpublishVolume", pb.ControllerUnpublishVolumeRequest(node_id=NODE)),
    )
    await csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vid))


# --- validate, get, list -------------------------------------------------------------------------


async def test_validate_volume_capabilities(csi: CsiClient) -> None:
    vid = (await create(csi, unique("val"))).volume.volume_id
    ok = await csi.call(
        "ValidateVolumeCapabilities",
        pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vid, volume_capabilities=[mount_cap(), block_cap()]
        ),
    )
    assert len(ok.confirmed.volume_capabilities) == 2
    no = await csi.call(
        "ValidateVolumeCapabilities",
        pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vid, volume_capabilities=[mount_cap(Mode.MULTI_NODE_MULTI_WRITER)]
        ),
    )
    assert not no.HasField("confirmed") and "one node" in no.message
    await fails(
        Code.NOT_FOUND,
        csi.call(
            "ValidateVolumeCapabilities",
            pb.ValidateVolumeCapabilitiesRequest(
                volume_id="vol-0123456789abcdef", volume_capabilities=[mount_cap()]
            ),
        ),
    )
    await fails(
        Code.INVALID_ARGUMENT,
        csi.call("ValidateVolumeCapabilities", pb.ValidateVolumeCapabilitiesRequest(volume_id=vid)),
    )
    await fails(
        Code.INVALID_ARGUMENT,
        csi.call(
            "ValidateVolumeCapabilities",
            pb.ValidateVolumeCapabilitiesRequest(volume_capabilities=[mount_cap()]),
        ),
    )
    await csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vid))


async def test_list_volumes_pages_through_every_volume_once(csi: CsiClient) -> None:
    made = {(await create(csi, unique("page"))).volume.volume_id for _ in range(7)}
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await csi.call(
            "ListVolumes", pb.ListVolumesRequest(max_entries=3, starting_token=token)
        )
        assert len(page.entries) <= 3
        seen += [e.volume.volume_id for e in page.entries]
        for e in page.entries:
            assert e.status.volume_condition.message
        pages += 1
        token = page.next_token
        if not token:
            break
    assert made <= set(seen) and len(seen) == len(set(seen)) and pages >= 3
    await fails(
        Code.ABORTED, csi.call("ListVolumes", pb.ListVolumesRequest(starting_token="garbage!"))
    )
    await fails(
        Code.ABORTED,
        csi.call("ListVolumes", pb.ListVolumesRequest(starting_token="Wzk5OTk5OTk5OSwiYSJd")),
    )
    await fails(
        Code.INVALID_ARGUMENT, csi.call("ListVolumes", pb.ListVolumesRequest(max_entries=-1))
    )
    for vid in made:
        await csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vid))


async def test_get_volume_reports_a_healthy_then_degraded_condition(
    csi: CsiClient, cluster: dict[str, Any]
) -> None:
    """The condition is meta's volume health (extent map and chunk server states): written
    extents with a replica on a chunk server that is down are degraded (then rebuilding)."""
    vid = (await create(csi, unique("cond"), 8 * MiB)).volume.volume_id
    got = await csi.call("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=vid))
    assert not got.status.volume_condition.abnormal
    ctx = (
        await csi.call(
            "ControllerPublishVolume",
            pb.ControllerPublishVolumeRequest(
                volume_id=vid, node_id=QEMU_IQN, volume_capability=block_cap()
            ),
        )
    ).publish_context
    qemu_io(f"iscsi://{ctx['portal']}/{ctx['targetIqn']}/{ctx['lun']}", "write -P 0x5a 0 1M")
    got = await csi.call("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=vid))
    assert not got.status.volume_condition.abnormal, got.status.volume_condition.message
    assert got.volume.capacity_bytes == 8 * MiB
    lunastor("dev", "stop", "chunk3", "--dir", cluster["dir"])
    try:

        async def abnormal() -> pb.VolumeCondition:
            for _ in range(100):
                got = await csi.call(
                    "ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=vid)
                )
                if got.status.volume_condition.abnormal:
                    return got.status.volume_condition
                await asyncio.sleep(0.2)
            raise AssertionError("the condition stayed normal with a chunk server down")

        cond = await abnormal()
        assert cond.message.startswith(("degraded", "rebuilding")), cond.message
        listed = await csi.call("ListVolumes", pb.ListVolumesRequest(max_entries=1000))
        mine = [e for e in listed.entries if e.volume.volume_id == vid]
        assert mine and mine[0].status.volume_condition.abnormal
        assert list(mine[0].status.published_node_ids) == [QEMU_IQN.lower()]
    finally:
        lunastor("dev", "start", "chunk3", "--dir", cluster["dir"])
    await csi.call("ControllerUnpublishVolume", pb.ControllerUnpublishVolumeRequest(volume_id=vid))
    await csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vid))


# --- capacity and topology -----------------------------------------------------------------------


async def test_get_capacity_per_zone(csi: CsiClient, cluster: dict[str, Any]) -> None:
    whole = await csi.call("GetCapacity", pb.GetCapacityRequest(parameters={"replicas": "1"}))
    assert whole.available_capacity > 0
    per_zone = []
    for zone in ("zone1", "zone2", "zone3"):
        got = await csi.call(
            "GetCapacity",
            pb.GetCapacityRequest(
                accessible_topology=pb.Topology(segments={ZONE_KEY: zone}),
                parameters={"replicas": "1"},
            ),
        )
        assert 0 < got.available_capacity < whole.available_capacity
        per_zone.append(got.available_capacity)
    # free space moves as the chunk servers report it: the zones add up to about the whole
    assert abs(sum(per_zone) - whole.available_capacity) < whole.available_capacity // 10
    three = await csi.call("GetCapacity", pb.GetCapacityRequest(parameters={"replicas": "3"}))
    assert (
        abs(three.available_capacity * 3 - whole.available_capacity)
        < whole.available_capacity // 10
    )
    mars = await csi.call(
        "GetCapacity",
        pb.GetCapacityRequest(accessible_topology=pb.Topology(segments={ZONE_KEY: "mars"})),
    )
    assert mars.available_capacity == 0
    await fails(
        Code.INVALID_ARGUMENT,
        csi.call(
            "GetCapacity",
            pb.GetCapacityRequest(accessible_topology=pb.Topology(segments={"rack": "r1"})),
        ),
    )


async def test_topology_places_the_volume_in_the_zones_asked_for(
    csi: CsiClient, cluster: dict[str, Any]
) -> None:
    """A 1-replica volume asked for in zone2 is accessible from zone2 only, and its data is
    written to zone2's chunk server; 2 replicas with zone3 preferred take zone3 then zone1."""
    req = pb.TopologyRequirement(
        requisite=[pb.Topology(segments={ZONE_KEY: z}) for z in ("zone1", "zone2")],
        preferred=[pb.Topology(segments={ZONE_KEY: "zone2"})],
    )
    one = await create(
        csi, unique("topo"), 8 * MiB, parameters={"replicas": "1"}, accessibility_requirements=req
    )
    assert [dict(t.segments) for t in one.volume.accessible_topology] == [{ZONE_KEY: "zone2"}]
    req2 = pb.TopologyRequirement(
        requisite=[pb.Topology(segments={ZONE_KEY: z}) for z in ("zone1", "zone3")],
        preferred=[pb.Topology(segments={ZONE_KEY: "zone3"})],
    )
    two = await create(
        csi, unique("topo2"), 8 * MiB, parameters={"replicas": "2"}, accessibility_requirements=req2
    )
    assert [t.segments[ZONE_KEY] for t in two.volume.accessible_topology] == ["zone3", "zone1"]
    # the data lands there
    status = api(cluster, "GET", "/v1/cluster")
    zone_of = {c["id"]: c["zone"] for c in status["chunk_servers"]}
    for vol, zones in ((one.volume, {"zone2"}), (two.volume, {"zone1", "zone3"})):
        ctx = (
            await csi.call(
                "ControllerPublishVolume",
                pb.ControllerPublishVolumeRequest(
                    volume_id=vol.volume_id, node_id=QEMU_IQN, volume_capability=block_cap()
                ),
            )
        ).publish_context
        qemu_io(f"iscsi://{ctx['portal']}/{ctx['targetIqn']}/{ctx['lun']}", "write -P 0x11 0 4M")
        extents = await extent_records(cluster, vol.volume_id)
        assert extents
        for e in extents:
            assert {zone_of[r] for r in e.replicas} == zones, e.replicas
        await csi.call(
            "ControllerUnpublishVolume",
            pb.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id),
        )
        await csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vol.volume_id))


# --- expansion -----------------------------------------------------------------------------------


async def test_expand(csi: CsiClient) -> None:
    vid = (await create(csi, unique("grow"))).volume.volume_id
    grow = pb.ControllerExpandVolumeRequest(
        volume_id=vid,
        capacity_range=pb.CapacityRange(required_bytes=100 * MiB + 3),
        volume_capability=mount_cap(),
    )
    got = await csi.call("ControllerExpandVolume", grow)
    assert got.capacity_bytes == 100 * MiB + 512 and got.node_expansion_required
    assert await csi.call("ControllerExpandVolume", grow) == got  # again: the same
    smaller = pb.ControllerExpandVolumeRequest(
        volume_id=vid,
        capacity_range=pb.CapacityRange(required_bytes=MiB),
        volume_capability=block_cap(),
    )
    got = await csi.call("ControllerExpandVolume", smaller)
    assert got.capacity_bytes == 100 * MiB + 512 and not got.node_expansion_required
    cases = [
        (pb.ControllerExpandVolumeRequest(volume_id=vid), Code.INVALID_ARGUMENT),
        (
            pb.ControllerExpandVolumeRequest(capacity_range=pb.CapacityRange(required_bytes=GiB)),
            Code.INVALID_ARGUMENT,
        ),
        (
            pb.ControllerExpandVolumeRequest(
                volume_id="vol-0123456789abcdef",
                capacity_range=pb.CapacityRange(required_bytes=GiB),
            ),
            Code.NOT_FOUND,
        ),
        (
            pb.ControllerExpandVolumeRequest(
                volume_id=vid,
                capacity_range=pb.CapacityRange(required_bytes=2 * GiB, limit_bytes=GiB),
            ),
            Code.OUT_OF_RANGE,
        ),
        (
            pb.ControllerExpandVolumeRequest(
                volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=1 << 51)
            ),
            Code.OUT_OF_RANGE,
        ),
    ]
    for req, code in cases:
        await fails(code, csi.call("ControllerExpandVolume", req))
    await csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vid))


async def test_qos_from_the_storage_class_and_modified_online(
    csi: CsiClient, cluster: dict[str, Any]
) -> None:
    """StorageClass parameters and a VolumeAttributesClass set a volume's QoS limits at
    creation; ControllerModifyVolume changes them (docs/qos.md)."""
    vid = (
        await create(
            csi,
            unique("qos"),
            parameters={"writeIops": "500", "bps": "100Mi"},
            mutable_parameters={"bps": "50Mi", "readIops": "300"},
        )
    ).volume.volume_id
    assert api(cluster, "GET", f"/v1/volumes/{vid}")["qos"] == {
        "write_iops": 500,
        "bps": 50 * MiB,
        "read_iops": 300,
    }
    modify = pb.ControllerModifyVolumeRequest(
        volume_id=vid, mutable_parameters={"writeIops": "0", "readIops": "1000"}
    )
    await csi.call("ControllerModifyVolume", modify)
    await csi.call("ControllerModifyVolume", modify)  # again: the same
    assert api(cluster, "GET", f"/v1/volumes/{vid}")["qos"] == {
        "bps": 50 * MiB,
        "read_iops": 1000,
    }
    cases = [
        (pb.ControllerModifyVolumeRequest(mutable_parameters={"iops": "1"}), Code.INVALID_ARGUMENT),
        (
            pb.ControllerModifyVolumeRequest(volume_id=vid, mutable_parameters={"replicas": "1"}),
            Code.INVALID_ARGUMENT,
        ),
        (
            pb.ControllerModifyVolumeRequest(volume_id=vid, mutable_parameters={"iops": "x"}),
            Code.INVALID_ARGUMENT,
        ),
        (
            # valid alone, refused by meta against the volume's limits (a burst below bps)
            pb.ControllerModifyVolumeRequest(volume_id=vid, mutable_parameters={"bpsBurst": "1Mi"}),
            Code.INVALID_ARGUMENT,
        ),
        (
            pb.ControllerModifyVolumeRequest(
                volume_id="vol-0123456789abcdef", mutable_parameters={"iops": "1"}
            ),
            Code.NOT_FOUND,
        ),
        (pb.ControllerModifyVolumeRequest(volume_id="nope"), Code.NOT_FOUND),
    ]
    for req, code in cases:
        await fails(code, csi.call("ControllerModifyVolume", req))
    await fails(
        Code.INVALID_ARGUMENT,
        create(csi, unique("qos-bad"), parameters={"iopsBurst": "10"}),
    )
    await csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vid))


# --- snapshots and clones ------------------------------------------------------------------------


async def test_snapshots_clones_and_listing(csi: CsiClient) -> None:
    src = (await create(csi, unique("snapsrc"), 32 * MiB)).volume.volume_id
    name = unique("snap")
    snap = (
        await csi.call("CreateSnapshot", pb.CreateSnapshotRequest(source_volume_id=src, name=name))
    ).snapshot
    assert snap.ready_to_use and snap.source_volume_id == src and snap.size_bytes == 32 * MiB
    assert snap.creation_time.seconds > 0
    again = await csi.call(
        "CreateSnapshot", pb.CreateSnapshotRequest(source_volume_id=src, name=name)
    )
    assert again.snapshot == snap
    other = (await create(csi, unique("snapother"))).volume.volume_id
    await fails(
        Code.ALREADY_EXISTS,
        csi.call("CreateSnapshot", pb.CreateSnapshotRequest(source_volume_id=other, name=name)),
    )
    await fails(
        Code.NOT_FOUND,
        csi.call(
            "CreateSnapshot",
            pb.CreateSnapshotRequest(source_volume_id="vol-0123456789abcdef", name=unique("s")),
        ),
    )
    await fails(
        Code.INVALID_ARGUMENT,
        csi.call("CreateSnapshot", pb.CreateSnapshotRequest(source_volume_id=src)),
    )
    await fails(
        Code.INVALID_ARGUMENT,
        csi.call("CreateSnapshot", pb.CreateSnapshotRequest(name=unique("s"))),
    )
    # listing: by id, by source, unknown ids give empty lists
    by_id = await csi.call("ListSnapshots", pb.ListSnapshotsRequest(snapshot_id=snap.snapshot_id))
    assert [e.snapshot for e in by_id.entries] == [snap]
    by_src = await csi.call("ListSnapshots", pb.ListSnapshotsRequest(source_volume_id=src))
    assert [e.snapshot.snapshot_id for e in by_src.entries] == [snap.snapshot_id]
    for req in (
        pb.ListSnapshotsRequest(snapshot_id="snap-0123456789abcdef"),
        pb.ListSnapshotsRequest(snapshot_id="not-ours"),
        pb.ListSnapshotsRequest(source_volume_id="vol-0123456789abcdef"),
        pb.ListSnapshotsRequest(snapshot_id=snap.snapshot_id, source_volume_id=other),
    ):
        assert list((await csi.call("ListSnapshots", req)).entries) == []
    # clones from the snapshot and from the volume; smaller than the source is made as big
    from_snap = await create(
        csi,
        unique("fromsnap"),
        MiB,
        volume_content_source=pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
        ),
    )
    assert from_snap.volume.capacity_bytes == 32 * MiB
    assert from_snap.volume.content_source.snapshot.snapshot_id == snap.snapshot_id
    clone = await create(
        csi,
        unique("clone"),
        64 * MiB,
        volume_content_source=pb.VolumeContentSource(
            volume=pb.VolumeContentSource.VolumeSource(volume_id=src)
        ),
    )
    assert clone.volume.content_source.volume.volume_id == src
    # a clone can be no smaller than its source: a limit below the source's size is refused
    await fails(
        Code.OUT_OF_RANGE,
        csi.call(
            "CreateVolume",
            pb.CreateVolumeRequest(
                name=unique("clone"),
                volume_capabilities=[mount_cap()],
                capacity_range=pb.CapacityRange(limit_bytes=MiB),
                volume_content_source=pb.VolumeContentSource(
                    volume=pb.VolumeContentSource.VolumeSource(volume_id=src)
                ),
            ),
        ),
    )
    # paging over snapshots
    extra = [
        (
            await csi.call(
                "CreateSnapshot",
                pb.CreateSnapshotRequest(source_volume_id=src, name=unique("snappage")),
            )
        ).snapshot.snapshot_id
        for _ in range(4)
    ]
    seen, token = [], ""
    while True:
        page = await csi.call(
            "ListSnapshots",
            pb.ListSnapshotsRequest(source_volume_id=src, max_entries=2, starting_token=token),
        )
        seen += [e.snapshot.snapshot_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert sorted(seen) == sorted([snap.snapshot_id, *extra])
    for sid in [snap.snapshot_id, *extra]:
        await csi.call("DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot_id=sid))
        await csi.call("DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot_id=sid))
    await csi.call("DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot_id="not-ours"))
    await fails(Code.INVALID_ARGUMENT, csi.call("DeleteSnapshot", pb.DeleteSnapshotRequest()))
    for vid in (src, other, from_snap.volume.volume_id, clone.volume.volume_id):
        await csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vid))


async def test_unimplemented_rpcs_answer_unimplemented(csi: CsiClient) -> None:
    await fails(Code.UNIMPLEMENTED, csi.call("NodeGetInfo", pb.NodeGetInfoRequest()))
