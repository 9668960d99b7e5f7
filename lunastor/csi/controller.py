"""The CSI Controller service: each RPC is one or two calls of the meta REST API
(docs/csi-mapping.md). The API is idempotent by name and serialises concurrent changes in
etcd transactions, so retries and concurrent duplicates of one request need no state here."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import Int64Value

from lunastor.csi import csi_pb2 as pb
from lunastor.csi.errors import invalid, not_found
from lunastor.csi.requests import (
    MAX_SIZE,
    READ_ONLY_MODES,
    SINGLE_NODE_MODES,
    api_name,
    capability_problem,
    check_capabilities,
    choose_zones,
    is_id,
    mutable_parameters,
    required,
    size_for,
    topologies,
    volume_parameters,
    zone_filter,
)
from lunastor.csi.rest import ApiError, RestClient, segment

T = TypeVar("T")
RPC = pb.ControllerServiceCapability.RPC
CAPABILITIES = (
    RPC.CREATE_DELETE_VOLUME,
    RPC.PUBLISH_UNPUBLISH_VOLUME,
    RPC.LIST_VOLUMES,
    RPC.LIST_VOLUMES_PUBLISHED_NODES,
    RPC.GET_CAPACITY,
    RPC.CREATE_DELETE_SNAPSHOT,
    RPC.LIST_SNAPSHOTS,
    RPC.CLONE_VOLUME,
    RPC.PUBLISH_READONLY,
    RPC.EXPAND_VOLUME,
    RPC.VOLUME_CONDITION,
    RPC.GET_VOLUME,
    RPC.SINGLE_NODE_MULTI_WRITER,
    RPC.MODIFY_VOLUME,
)
LIST_MAX = 1000  # the API's page limit
FAN_OUT = 16  # concurrent per-volume reads while listing


async def gather_bounded(calls: Iterable[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    return list(await asyncio.gather(*(one(c) for c in calls)))


def volume_message(view: dict[str, Any]) -> pb.Volume:
    """The CSI Volume of an API volume view. `volume_context` carries what the node needs
    and never changes for a volume (CSI: it is cached by the CO)."""
    context = {"blockSize": str(view["block_size"]), "replicas": str(view["replicas"])}
    fs_type = view.get("labels", {}).get("lunastor.io/fs-type")
    if fs_type:
        context["fsType"] = fs_type
    vol = pb.Volume(
        capacity_bytes=view["size_bytes"],
        volume_id=view["id"],
        volume_context=context,
        accessible_topology=topologies(view.get("zones") or []),
    )
    source = view.get("source") or {}
    if "snapshot_id" in source:
        vol.content_source.snapshot.snapshot_id = source["snapshot_id"]
    elif "volume_id" in source:
        vol.content_source.volume.volume_id = source["volume_id"]
    return vol


def snapshot_message(view: dict[str, Any]) -> pb.Snapshot:
    created = Timestamp()
    created.FromNanoseconds(int(view["created_at"] * 1e9))
    return pb.Snapshot(
        size_bytes=view["size_bytes"],
        snapshot_id=view["id"],
        source_volume_id=view["source_volume_id"],
        creation_time=created,
        ready_to_use=view["ready_to_use"],
    )


def condition_message(status: dict[str, Any]) -> pb.VolumeCondition:
    """The CSI condition of a volume's status (meta's `volume_health`: ok, degraded,
    rebuilding or unavailable, from its extent map and the chunk servers' states; and the
    blocks scrub found bad and could not repair)."""
    message = f"{status['health']}: {status['health_detail']}"
    bad = status.get("scrub_errors", 0)
    if bad:
        message += f"; scrub: {bad} blocks fail their checksum with no good copy to repair from"
    return pb.VolumeCondition(abnormal=status["health"] != "ok" or bad > 0, message=message)


class ControllerService:
    def __init__(self, api: RestClient) -> None:
        self.api = api

    # --- helpers --------------------------------------------------------------------------

    async def _volume(self, volume_id: str) -> dict[str, Any]:
        """The volume's view; NOT_FOUND for an id that names no volume (or cannot)."""
        required(volume_id, "volume_id")
        if not is_id("vol", volume_id):
            raise not_found(f"no volume {volume_id!r}")
        view: dict[str, Any] = await self.api.get(f"/v1/volumes/{segment(volume_id)}")
        return view

    async def _published_nodes(self, volume_id: str) -> list[str]:
        exports = await self.api.get(f"/v1/volumes/{segment(volume_id)}/exports")
        return [e["initiator"] for e in exports["items"]]

    async def _condition(self, volume_id: str) -> pb.VolumeCondition:
        return condition_message(await self.api.get(f"/v1/volumes/{segment(volume_id)}/status"))

    async def _live_servers_per_zone(self) -> dict[str, int]:
        capacity = await self.api.get("/v1/capacity")
        return {z["zone"]: z["chunk_servers"] for z in capacity["zones"] if z["free_bytes"] > 0}

    # --- volumes --------------------------------------------------------------------------

    async def CreateVolume(self, req: pb.CreateVolumeRequest, ctx: Any) -> pb.CreateVolumeResponse:
        name = api_name(req.name)
        check_capabilities(req.volume_capabilities, "volume_capabilities")
        params = volume_parameters(req.parameters)
        body: dict[str, Any] = {
            "name": name,
            "replicas": params.replicas,
            "block_size": params.block_size,
        }
        if params.fs_type:
            body["labels"] = {"lunastor.io/fs-type": params.fs_type}
        # QoS limits (docs/qos.md): the StorageClass's, overridden by a VolumeAttributesClass's
        qos = {**params.qos, **mutable_parameters(req.mutable_parameters)}
        if any(qos.values()):
            body["qos"] = {k: v for k, v in qos.items() if v}
        minimum = 0
        kind = req.volume_content_source.WhichOneof("type")
        if kind == "snapshot":
            sid = required(req.volume_content_source.snapshot.snapshot_id, "snapshot_id")
            if not is_id("snap", sid):
                raise not_found(f"no snapshot {sid!r}")
            body["source"] = {"snapshot_id": sid}
            minimum = (await self._source(f"/v1/snapshots/{segment(sid)}"))["size_bytes"]
        elif kind == "volume":
            vid = required(req.volume_content_source.volume.volume_id, "volume_id")
            if not is_id("vol", vid):
                raise not_found(f"no volume {vid!r}")
            body["source"] = {"volume_id": vid}
            minimum = (await self._source(f"/v1/volumes/{segment(vid)}"))["size_bytes"]
        body["size_bytes"] = size_for(
            req.capacity_range if req.HasField("capacity_range") else None,
            params.block_size,
            minimum,
        )
        if req.HasField("accessibility_requirements"):
            zones = choose_zones(
                req.accessibility_requirements,
                await self._live_servers_per_zone(),
                params.replicas,
            )
            if zones:
                body["zones"] = zones
        view = await self.api.post("/v1/volumes", body)  # source_not_found is NOT_FOUND
        return pb.CreateVolumeResponse(volume=volume_message(view))

    async def _source(self, path: str) -> dict[str, Any]:
        try:
            view: dict[str, Any] = await self.api.get(path)
        except ApiError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                raise not_found(f"content source: {exc.message}") from None
            raise
        return view

    async def DeleteVolume(self, req: pb.DeleteVolumeRequest, ctx: Any) -> pb.DeleteVolumeResponse:
        volume_id = required(req.volume_id, "volume_id")
        if is_id("vol", volume_id):  # an id that cannot be ours names nothing to delete
            await self.api.delete(f"/v1/volumes/{segment(volume_id)}")
        return pb.DeleteVolumeResponse()

    async def ControllerPublishVolume(
        self, req: pb.ControllerPublishVolumeRequest, ctx: Any
    ) -> pb.ControllerPublishVolumeResponse:
        volume_id = required(req.volume_id, "volume_id")
        node_id = required(req.node_id, "node_id")
        if not req.HasField("volume_capability"):
            raise invalid("volume_capability: required")
        problem = capability_problem(req.volume_capability)
        if problem is not None:
            raise invalid(f"volume_capability.{problem}")
        await self._volume(volume_id)
        if not node_id.lower().startswith(("iqn.", "eui.", "naa.")):
            # node ids are initiator names (NodeGetInfo): anything else names no node
            raise not_found(f"no node {node_id!r}: node ids are iSCSI initiator names")
        mode = req.volume_capability.access_mode.mode
        # single-node modes: the API refuses the export while another node has one, in the
        # same etcd transaction (409 volume_in_use: FAILED_PRECONDITION, as CSI asks)
        body = {"initiator": node_id, "exclusive": mode in SINGLE_NODE_MODES}
        try:
            export = await self.api.post(f"/v1/volumes/{segment(volume_id)}/exports", body)
        except ApiError as exc:
            if exc.problem == "invalid_field" and exc.body.get("field") == "initiator":
                raise not_found(f"no node {node_id!r}: {exc.message}") from None
            raise
        context = {
            "portal": export["portal"],
            "targetIqn": export["target_iqn"],
            "lun": str(export["lun"]),
            "readonly": str(req.readonly or mode in READ_ONLY_MODES).lower(),
        }
        return pb.ControllerPublishVolumeResponse(publish_context=context)

    async def ControllerUnpublishVolume(
        self, req: pb.ControllerUnpublishVolumeRequest, ctx: Any
    ) -> pb.ControllerUnpublishVolumeResponse:
        volume_id = required(req.volume_id, "volume_id")
        if not is_id("vol", volume_id):
            raise not_found(f"no volume {volume_id!r}")
        await self._volume(volume_id)
        nodes = [req.node_id] if req.node_id else await self._published_nodes(volume_id)
        for node in nodes:  # no node_id: unpublish from every node (CSI)
            if node.lower().startswith(("iqn.", "eui.", "naa.")):
                await self.api.delete(
                    f"/v1/volumes/{segment(volume_id)}/exports/{segment(node.lower())}"
                )
        return pb.ControllerUnpublishVolumeResponse()

    async def ValidateVolumeCapabilities(
        self, req: pb.ValidateVolumeCapabilitiesRequest, ctx: Any
    ) -> pb.ValidateVolumeCapabilitiesResponse:
        volume_id = required(req.volume_id, "volume_id")
        if not req.volume_capabilities:
            raise invalid("volume_capabilities: at least one is required")
        await self._volume(volume_id)
        volume_parameters(req.parameters)
        for cap in req.volume_capabilities:
            problem = capability_problem(cap)
            if problem is not None:  # not an error: the answer is "not confirmed" and why
                return pb.ValidateVolumeCapabilitiesResponse(message=problem)
        confirmed = pb.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=req.volume_context,
            volume_capabilities=req.volume_capabilities,
            parameters=req.parameters,
        )
        return pb.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    async def ListVolumes(self, req: pb.ListVolumesRequest, ctx: Any) -> pb.ListVolumesResponse:
        if req.max_entries < 0:
            raise invalid("max_entries: must not be negative")
        page = await self.api.get(
            "/v1/volumes",
            limit=min(req.max_entries or 100, LIST_MAX),
            next=req.starting_token or None,
        )

        async def entry(view: dict[str, Any]) -> pb.ListVolumesResponse.Entry:
            try:
                nodes, condition = await asyncio.gather(
                    self._published_nodes(view["id"]), self._condition(view["id"])
                )
            except ApiError as exc:
                if exc.code != grpc.StatusCode.NOT_FOUND:
                    raise
                # deleted since the page was read: listed as it was, with no nodes
                nodes, condition = [], pb.VolumeCondition(abnormal=False, message="deleted")
            status = pb.ListVolumesResponse.VolumeStatus(
                published_node_ids=nodes, volume_condition=condition
            )
            return pb.ListVolumesResponse.Entry(volume=volume_message(view), status=status)

        entries = await gather_bounded([partial(entry, v) for v in page["items"]], FAN_OUT)
        return pb.ListVolumesResponse(entries=entries, next_token=page["next"] or "")

    async def ControllerGetVolume(
        self, req: pb.ControllerGetVolumeRequest, ctx: Any
    ) -> pb.ControllerGetVolumeResponse:
        view = await self._volume(req.volume_id)
        nodes, condition = await asyncio.gather(
            self._published_nodes(view["id"]), self._condition(view["id"])
        )
        status = pb.ControllerGetVolumeResponse.VolumeStatus(
            published_node_ids=nodes, volume_condition=condition
        )
        return pb.ControllerGetVolumeResponse(volume=volume_message(view), status=status)

    async def ControllerModifyVolume(
        self, req: pb.ControllerModifyVolumeRequest, ctx: Any
    ) -> pb.ControllerModifyVolumeResponse:
        """A VolumeAttributesClass change: the QoS limits it names change online (the ones
        it does not name stay; "0" removes one), open sessions follow within a second."""
        volume_id = required(req.volume_id, "volume_id")
        changes = mutable_parameters(req.mutable_parameters)
        if not is_id("vol", volume_id):
            raise not_found(f"no volume {volume_id!r}")
        if changes:
            await self.api.patch(f"/v1/volumes/{segment(volume_id)}", {"qos": changes})
        else:
            await self._volume(volume_id)  # NOT_FOUND for a volume that does not exist
        return pb.ControllerModifyVolumeResponse()

    async def ControllerExpandVolume(
        self, req: pb.ControllerExpandVolumeRequest, ctx: Any
    ) -> pb.ControllerExpandVolumeResponse:
        volume_id = required(req.volume_id, "volume_id")
        if not req.HasField("capacity_range"):
            raise invalid("capacity_range: required")
        view = await self._volume(volume_id)
        size = size_for(req.capacity_range, view["block_size"])
        if size < view["size_bytes"]:  # CSI: a smaller request is satisfied by the volume
            size = view["size_bytes"]
        grown = await self.api.post(
            f"/v1/volumes/{segment(volume_id)}/expand", {"size_bytes": size}
        )
        block = req.HasField("volume_capability") and req.volume_capability.HasField("block")
        return pb.ControllerExpandVolumeResponse(
            capacity_bytes=grown["size_bytes"], node_expansion_required=not block
        )

    async def GetCapacity(self, req: pb.GetCapacityRequest, ctx: Any) -> pb.GetCapacityResponse:
        for i, cap in enumerate(req.volume_capabilities):
            problem = capability_problem(cap)
            if problem is not None:
                raise invalid(f"volume_capabilities[{i}].{problem}")
        params = volume_parameters(req.parameters)
        zone = zone_filter(req.accessible_topology if req.HasField("accessible_topology") else None)
        capacity = await self.api.get("/v1/capacity", zone=zone)
        # every byte is stored `replicas` times: that is how large a volume can still grow
        available = capacity["free_bytes"] // params.replicas
        return pb.GetCapacityResponse(
            available_capacity=available,
            maximum_volume_size=Int64Value(value=min(MAX_SIZE, available)),
            minimum_volume_size=Int64Value(value=params.block_size),
        )

    async def ControllerGetCapabilities(
        self, req: pb.ControllerGetCapabilitiesRequest, ctx: Any
    ) -> pb.ControllerGetCapabilitiesResponse:
        return pb.ControllerGetCapabilitiesResponse(
            capabilities=[pb.ControllerServiceCapability(rpc=RPC(type=t)) for t in CAPABILITIES]
        )

    # --- snapshots ------------------------------------------------------------------------

    async def CreateSnapshot(
        self, req: pb.CreateSnapshotRequest, ctx: Any
    ) -> pb.CreateSnapshotResponse:
        name = api_name(req.name)
        volume_id = required(req.source_volume_id, "source_volume_id")
        if req.parameters:
            raise invalid(f"parameters: lunastor snapshots take none ({', '.join(req.parameters)})")
        if not is_id("vol", volume_id):
            raise not_found(f"no volume {volume_id!r}")
        view = await self.api.post("/v1/snapshots", {"name": name, "volume_id": volume_id})
        return pb.CreateSnapshotResponse(snapshot=snapshot_message(view))

    async def DeleteSnapshot(
        self, req: pb.DeleteSnapshotRequest, ctx: Any
    ) -> pb.DeleteSnapshotResponse:
        snapshot_id = required(req.snapshot_id, "snapshot_id")
        if is_id("snap", snapshot_id):
            await self.api.delete(f"/v1/snapshots/{segment(snapshot_id)}")
        return pb.DeleteSnapshotResponse()

    async def ListSnapshots(
        self, req: pb.ListSnapshotsRequest, ctx: Any
    ) -> pb.ListSnapshotsResponse:
        if req.max_entries < 0:
            raise invalid("max_entries: must not be negative")
        if req.snapshot_id:
            views = []
            if is_id("snap", req.snapshot_id):
                try:
                    views = [await self.api.get(f"/v1/snapshots/{segment(req.snapshot_id)}")]
                except ApiError as exc:
                    if exc.code != grpc.StatusCode.NOT_FOUND:
                        raise
            if req.source_volume_id:
                views = [v for v in views if v["source_volume_id"] == req.source_volume_id]
            return pb.ListSnapshotsResponse(
                entries=[
                    pb.ListSnapshotsResponse.Entry(snapshot=snapshot_message(v)) for v in views
                ]
            )
        if req.source_volume_id and not is_id("vol", req.source_volume_id):
            return pb.ListSnapshotsResponse()
        page = await self.api.get(
            "/v1/snapshots",
            limit=min(req.max_entries or 100, LIST_MAX),
            next=req.starting_token or None,
            volume_id=req.source_volume_id or None,
        )
        return pb.ListSnapshotsResponse(
            entries=[
                pb.ListSnapshotsResponse.Entry(snapshot=snapshot_message(v)) for v in page["items"]
            ],
            next_token=page["next"] or "",
        )
