"""The node plugin's argument and idempotency rules, the way the CSI sanity suite checks them,
against a real `lunastor-csi --mode node` process on this host. None of these calls reaches
iSCSI: the working node flow (login, mkfs, mount, expansion, restarts, failover) runs with the
kernel initiator in the QEMU guest (tests/kernel/csi_scenarios.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from lunastor.csi import csi_pb2 as pb
from lunastor.csi.client import CsiClient
from tests.csi.conftest import Plugin, block_cap, mount_cap, start_plugin, stop_plugin

NODE = "iqn.2026-11.io.lunastor.test:rules"
Code = grpc.StatusCode
CTX = {"portal": "127.0.0.1:3260", "targetIqn": "iqn.2026-11.io.lunastor:tgt-0", "lun": "1"}


@pytest.fixture(scope="module")
def node_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plugin]:
    directory = tmp_path_factory.mktemp("csi-node")
    plugin = start_plugin(
        directory, "node", f"node_id={NODE}", "zone=zone7", "max_volumes=40", mode="node"
    )
    try:
        yield plugin
    finally:
        assert stop_plugin(plugin) == 0, plugin.log.read_text()[-3000:]


@pytest.fixture
async def node(node_plugin: Plugin) -> AsyncIterator[CsiClient]:
    client = CsiClient(node_plugin.endpoint)
    try:
        yield client
    finally:
        await client.close()


async def fails(node: CsiClient, code: grpc.StatusCode, rpc: str, request: object) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await node.call(rpc, request)
    assert info.value.code() == code, info.value.details()


async def test_info_and_capabilities(node: CsiClient) -> None:
    info = await node.call("NodeGetInfo", pb.NodeGetInfoRequest())
    assert info.node_id == NODE and info.max_volumes_per_node == 40
    assert dict(info.accessible_topology.segments) == {"topology.lunastor.io/zone": "zone7"}
    caps = await node.call("NodeGetCapabilities", pb.NodeGetCapabilitiesRequest())
    RPC = pb.NodeServiceCapability.RPC
    assert {c.rpc.type for c in caps.capabilities} >= {
        RPC.STAGE_UNSTAGE_VOLUME,
        RPC.GET_VOLUME_STATS,
        RPC.EXPAND_VOLUME,
        RPC.VOLUME_CONDITION,
    }
    await fails(node, Code.UNIMPLEMENTED, "CreateVolume", pb.CreateVolumeRequest(name="x"))


@pytest.mark.parametrize(
    ("rpc", "request_message", "code"),
    [
        (
            "NodeStageVolume",
            pb.NodeStageVolumeRequest(
                staging_target_path="/s", volume_capability=mount_cap(), publish_context=CTX
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            "NodeStageVolume",
            pb.NodeStageVolumeRequest(
                volume_id="v", volume_capability=mount_cap(), publish_context=CTX
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            "NodeStageVolume",
            pb.NodeStageVolumeRequest(volume_id="v", staging_target_path="/s", publish_context=CTX),
            Code.INVALID_ARGUMENT,
        ),
        (
            "NodeStageVolume",
            pb.NodeStageVolumeRequest(
                volume_id="v", staging_target_path="/s", volume_capability=mount_cap()
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            "NodeStageVolume",
            pb.NodeStageVolumeRequest(
                volume_id="v",
                staging_target_path="/s",
                volume_capability=mount_cap(fs_type="ntfs"),
                publish_context=CTX,
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            "NodeStageVolume",
            pb.NodeStageVolumeRequest(
                volume_id="v",
                staging_target_path="/s",
                volume_capability=mount_cap(),
                publish_context={**CTX, "lun": "x"},
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            "NodeStageVolume",
            pb.NodeStageVolumeRequest(
                volume_id="v",
                staging_target_path="/s",
                volume_capability=mount_cap(),
                publish_context=CTX,
                secrets={"user": "u"},
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            "NodeUnstageVolume",
            pb.NodeUnstageVolumeRequest(staging_target_path="/s"),
            Code.INVALID_ARGUMENT,
        ),
        ("NodeUnstageVolume", pb.NodeUnstageVolumeRequest(volume_id="v"), Code.INVALID_ARGUMENT),
        (
            "NodePublishVolume",
            pb.NodePublishVolumeRequest(
                staging_target_path="/s", target_path="/t", volume_capability=mount_cap()
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            "NodePublishVolume",
            pb.NodePublishVolumeRequest(
                volume_id="v", target_path="/t", volume_capability=mount_cap()
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            "NodePublishVolume",
            pb.NodePublishVolumeRequest(
                volume_id="v", staging_target_path="/s", volume_capability=mount_cap()
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            "NodePublishVolume",
            pb.NodePublishVolumeRequest(volume_id="v", staging_target_path="/s", target_path="/t"),
            Code.INVALID_ARGUMENT,
        ),
        (
            "NodeUnpublishVolume",
            pb.NodeUnpublishVolumeRequest(target_path="/t"),
            Code.INVALID_ARGUMENT,
        ),
        (
            "NodeUnpublishVolume",
            pb.NodeUnpublishVolumeRequest(volume_id="v"),
            Code.INVALID_ARGUMENT,
        ),
        (
            "NodeGetVolumeStats",
            pb.NodeGetVolumeStatsRequest(volume_path="/t"),
            Code.INVALID_ARGUMENT,
        ),
        ("NodeGetVolumeStats", pb.NodeGetVolumeStatsRequest(volume_id="v"), Code.INVALID_ARGUMENT),
        (
            "NodeGetVolumeStats",
            pb.NodeGetVolumeStatsRequest(volume_id="v", volume_path="/no/such/path"),
            Code.NOT_FOUND,
        ),
        ("NodeExpandVolume", pb.NodeExpandVolumeRequest(volume_path="/t"), Code.INVALID_ARGUMENT),
        (
            "NodeExpandVolume",
            pb.NodeExpandVolumeRequest(volume_id="v", volume_path="/no/such/path"),
            Code.NOT_FOUND,
        ),
    ],
)
async def test_bad_requests(
    node: CsiClient, rpc: str, request_message: object, code: grpc.StatusCode
) -> None:
    await fails(node, code, rpc, request_message)


async def test_publish_of_an_unstaged_volume_and_stats_of_a_plain_directory(
    node: CsiClient, tmp_path: Path
) -> None:
    staging, target = tmp_path / "staging", tmp_path / "pod" / "mount"
    staging.mkdir()
    for cap in (mount_cap(), block_cap()):
        await fails(
            node,
            Code.FAILED_PRECONDITION,
            "NodePublishVolume",
            pb.NodePublishVolumeRequest(
                volume_id="vol-0123456789abcdef",
                staging_target_path=str(staging),
                target_path=str(target),
                volume_capability=cap,
            ),
        )
    # a directory that holds no lunastor volume: NOT_FOUND, not some other disk's numbers
    await fails(
        node,
        Code.NOT_FOUND,
        "NodeGetVolumeStats",
        pb.NodeGetVolumeStatsRequest(volume_id="v", volume_path=str(tmp_path)),
    )


async def test_unpublish_and_unstage_of_nothing_succeed_twice(
    node: CsiClient, tmp_path: Path
) -> None:
    target = tmp_path / "pod" / "mount"
    target.mkdir(parents=True)
    for _ in range(2):
        await node.call(
            "NodeUnpublishVolume",
            pb.NodeUnpublishVolumeRequest(volume_id="vol-1", target_path=str(target)),
        )
        await node.call(
            "NodeUnstageVolume",
            pb.NodeUnstageVolumeRequest(volume_id="vol-1", staging_target_path=str(tmp_path / "s")),
        )
    assert not target.exists()  # the CO's target path is removed on unpublish
