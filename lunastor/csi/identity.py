"""The CSI Identity service: who the plugin is, what it offers, and whether it can work now
(Probe asks the REST API in the controller, iscsiadm and the kernel on a node)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.wrappers_pb2 import BoolValue

import lunastor
from lunastor.csi import csi_pb2 as pb

Service = pb.PluginCapability.Service
Expansion = pb.PluginCapability.VolumeExpansion


class IdentityService:
    def __init__(self, name: str, probe: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self.probe = probe  # raises a CsiError when the plugin cannot work

    async def GetPluginInfo(self, req: Any, ctx: Any) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name=self.name, vendor_version=lunastor.__version__)

    async def GetPluginCapabilities(self, req: Any, ctx: Any) -> pb.GetPluginCapabilitiesResponse:
        caps = [
            pb.PluginCapability(service=Service(type=Service.CONTROLLER_SERVICE)),
            pb.PluginCapability(service=Service(type=Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
            pb.PluginCapability(volume_expansion=Expansion(type=Expansion.ONLINE)),
        ]
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    async def Probe(self, req: Any, ctx: Any) -> pb.ProbeResponse:
        await self.probe()
        return pb.ProbeResponse(ready=BoolValue(value=True))
