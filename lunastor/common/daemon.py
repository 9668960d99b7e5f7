"""How every lunastor daemon runs: arguments, config, uvloop, signals, its HTTP servers.

Each daemon's `main` only says *what* to run (a coroutine given a stop event); this module knows
*how* (the model is Swift's `common/daemon.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import uvloop
from aiohttp import web

from lunastor.common.config import ConfigError, load_config
from lunastor.common.http.server import HttpServer

C = TypeVar("C")


class StartupError(Exception):
    """The daemon cannot start (address in use, data directory unusable, ...): one clear line."""


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); raise ConfigError naming `what`."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{what}: bad port in {value!r}") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"{what}: port out of range in {value!r}")
    return host, number


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def config_argparser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", metavar="PATH", help="TOML configuration file")
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override one setting, e.g. --set etcd.endpoints=127.0.0.1:2379 (repeatable)",
    )
    return parser


def load_daemon_config(cls: type[C], args: argparse.Namespace) -> C:
    return load_config(cls, args.config, overrides=args.overrides)


def run_daemon(prog: str, body: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run `body(stop)` on uvloop until it returns; SIGTERM/SIGINT set `stop`.

    Configuration and start-up errors become one line on stderr and exit status 2 (config) or 1.
    """

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await body(stop)

    try:
        return uvloop.run(runner())
    except ConfigError as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"{prog}: cannot start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """A TLS server context from PEM files; unreadable files are a StartupError naming them."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"tls_cert {cert} / tls_key {key}: {exc}") from None
    return context


async def start_http(
    app: web.Application, listen: str, what: str, ssl_context: ssl.SSLContext | None = None
) -> HttpServer:
    """Serve `app` on `listen` (HOST:PORT) with lunastor's HTTP server (common/http), over TLS
    when `ssl_context` is given; a bind failure is a StartupError naming it. `close()` it."""
    host, port = parse_hostport(listen, what)
    server = HttpServer(app)
    try:
        await server.start(host, port, ssl_context)
    except OSError as exc:
        raise StartupError(f"{what} {listen}: {exc.strerror or exc}") from None
    return server
