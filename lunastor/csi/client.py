"""A CSI client the way a CO calls a plugin (kubelet, the sidecars): one unary call per RPC
over the plugin's socket. Tests use it, and `lunastor-csi call` for operators' debugging."""

from __future__ import annotations

from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from lunastor.csi import csi_pb2
from lunastor.csi.server import message_class, method_path

M = TypeVar("M", bound=Message)


def _method(rpc: str) -> tuple[str, type[Message]]:
    for service in csi_pb2.DESCRIPTOR.services_by_name.values():
        m = service.methods_by_name.get(rpc)
        if m is not None:
            return method_path(service.name, rpc), message_class(m.output_type.name)
    raise KeyError(f"no CSI RPC {rpc}")


class CsiClient:
    """`await client.call("CreateVolume", request)`: the response, or grpc.aio.AioRpcError."""

    def __init__(self, endpoint: str) -> None:
        target = (
            endpoint.replace("unix:///", "unix:/", 1)
            if endpoint.startswith("unix://")
            else endpoint
        )
        self.channel = grpc.aio.insecure_channel(target)

    async def call(self, rpc: str, request: Message, timeout: float = 120) -> Any:
        path, response = _method(rpc)
        stub = self.channel.unary_unary(
            path,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )
        return await stub(request, timeout=timeout)

    async def close(self) -> None:
        await self.channel.close()
