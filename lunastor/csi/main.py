"""`lunastor-csi --mode controller|node --endpoint unix:///csi/csi.sock`: the CSI plugin.

controller: Identity + Controller, a client of the meta REST API (token of role `csi`).
node: Identity + Node, driving this node's open-iscsi, mkfs and mount. Both serve /metrics
and /healthz on `metrics_listen` when it is set.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from lunastor.common.daemon import (
    StartupError,
    config_argparser,
    load_daemon_config,
    run_daemon,
    start_http,
)
from lunastor.common.logs import setup_logging
from lunastor.common.metrics import add_admin_routes, describe_daemon
from lunastor.csi.config import CsiConfig
from lunastor.csi.controller import ControllerService
from lunastor.csi.errors import CsiError
from lunastor.csi.identity import IdentityService
from lunastor.csi.node import NodeService
from lunastor.csi.rest import RestClient
from lunastor.csi.server import serve

PROG = "lunastor-csi"


def parser() -> argparse.ArgumentParser:
    p = config_argparser(PROG, "lunastor's Kubernetes CSI plugin")
    p.add_argument("--mode", choices=("controller", "node"), required=True)
    p.add_argument(
        "--endpoint",
        default="unix:///csi/csi.sock",
        help="where the CO connects: unix:///PATH or HOST:PORT (default unix:///csi/csi.sock)",
    )
    return p


async def run(args: argparse.Namespace, stop: asyncio.Event) -> int:
    config = load_daemon_config(CsiConfig, args)
    log = setup_logging(config.log, f"csi-{args.mode}")
    describe_daemon(f"csi-{args.mode}")
    services: list[tuple[str, object]] = []
    api: RestClient | None = None
    if args.mode == "controller":
        api = RestClient(config.api_url, config.token())
        controller = ControllerService(api)

        async def probe() -> None:
            await api.get("/v1/capacity")  # the API answers, and takes our token

        services.append(("Controller", controller))
    else:
        node = NodeService(config)
        try:
            await node.start()
        except CsiError as exc:  # no initiator name: nothing this node could be published to
            raise StartupError(exc.message) from None
        probe = node.probe
        services.append(("Node", node))
    services.insert(0, ("Identity", IdentityService(config.driver_name, probe)))
    try:
        server = await serve(args.endpoint, services)
    except (OSError, RuntimeError) as exc:
        raise StartupError(f"endpoint {args.endpoint}: {exc}") from None
    metrics = None
    if config.metrics_listen:

        async def health() -> dict[str, Any]:
            try:
                await probe()
            except CsiError as exc:
                return {"status": "unavailable", "detail": exc.message}
            return {"status": "ok"}

        app = web.Application()
        add_admin_routes(app, health)
        metrics = await start_http(app, config.metrics_listen, "metrics_listen")
    log.info("serving", mode=args.mode, endpoint=args.endpoint, driver=config.driver_name)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=5)
        if metrics is not None:
            await metrics.close()
        if api is not None:
            await api.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_daemon(PROG, lambda stop: run(args, stop))


if __name__ == "__main__":
    sys.exit(main())
