"""The gRPC side: service handlers built from the .proto's own descriptors (no generated
stubs), one wrapper that turns `CsiError` into a status and counts every call, and the
unix-socket server the sidecars and kubelet connect to."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.message import Message
from prometheus_client import Counter, Histogram

from lunastor.common.logs import get_logger
from lunastor.csi import csi_pb2
from lunastor.csi.errors import CsiError

CALLS = Counter("lunastor_csi_calls_total", "CSI calls by method and status", ["method", "code"])
LATENCY = Histogram(
    "lunastor_csi_call_seconds",
    "CSI call latency by method",
    ["method"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)

log = get_logger(component="csi")

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]


def message_class(name: str) -> type[Message]:
    cls: type[Message] = getattr(csi_pb2, name)
    return cls


def method_path(service: str, method: str) -> str:
    return f"/csi.v1.{service}/{method}"


def _wrap(method: str, fn: Handler) -> Handler:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Message:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await fn(request, context)
        except CsiError as exc:
            code = exc.code
            log.info("csi call failed", method=method, code=code.name, error=exc.message)
            await context.abort(exc.code, exc.message)
            raise  # abort() raises; this line is for type checkers
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("csi call crashed", method=method)
            await context.abort(code, f"internal error: {exc}")
            raise
        finally:
            CALLS.labels(method, code.name).inc()
            LATENCY.labels(method).observe(time.perf_counter() - start)

    return handler


def service_handler(service: str, impl: object) -> grpc.GenericRpcHandler:
    """The handler of `csi.v1.<service>`: every method of the .proto that `impl` defines (an
    async `Method(request, context)`); the others are answered UNIMPLEMENTED by gRPC."""
    desc = csi_pb2.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for m in desc.methods:
        fn = getattr(impl, m.name, None)
        if fn is None:
            continue
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            _wrap(m.name, fn),
            request_deserializer=message_class(m.input_type.name).FromString,
            response_serializer=message_class(m.output_type.name).SerializeToString,
        )
    return grpc.method_handlers_generic_handler(f"csi.v1.{service}", handlers)


def unix_path(endpoint: str) -> str | None:
    """The socket file of a `unix:///path` endpoint (None for TCP endpoints)."""
    if endpoint.startswith("unix://"):
        return endpoint.removeprefix("unix://") or None
    return None


async def serve(endpoint: str, services: Iterable[tuple[str, object]]) -> grpc.aio.Server:
    """Start a server on `endpoint` (`unix:///csi/csi.sock` or `host:port`); a stale socket
    file left by a killed plugin is removed first, as every CSI plugin must."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([service_handler(name, impl) for name, impl in services])
    path = unix_path(endpoint)
    if path is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)
        address = f"unix:{path}"
    else:
        address = endpoint
    if server.add_insecure_port(address) == 0 and path is None:
        raise OSError(f"cannot listen on {endpoint}")
    await server.start()
    return server
