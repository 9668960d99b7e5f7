"""The meta application in-process (served by lunastor's HTTP server, as the meta daemon
serves it; aiohttp's test client) against the session's real etcd."""

from __future__ import annotations

import contextlib
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from lunastor.common.config import EtcdSettings, to_toml_table
from lunastor.common.etcd import Etcd
from lunastor.common.records import ChunkServerInfo, ChunkServerStatus, Keys
from lunastor.common.settings import etcd_client_config
from lunastor.meta.app import make_app
from lunastor.meta.config import AuthSettings, MetaConfig
from lunastor.meta.luns import LunMap
from tests.support.etcd import EtcdServer
from tests.support.http import ServedApp
from tests.support.procs import free_port, wait_for

TOKENS = {"admin": "admin-t", "csi": "csi-t", "reader": "reader-t"}
PORTAL = "10.9.0.100:3260"
SECRET_KEY = "test-sealing-key-0123456789"


def meta_config(etcd_server: EtcdServer, prefix: str, secret_key: str = SECRET_KEY) -> MetaConfig:
    return MetaConfig(
        portal=PORTAL,
        secret_key=secret_key,
        auth=AuthSettings(
            admin_tokens=[TOKENS["admin"]],
            csi_tokens=[TOKENS["csi"]],
            reader_tokens=[TOKENS["reader"]],
        ),
        etcd=EtcdSettings(endpoints=[etcd_server.endpoint], namespace=prefix.rstrip("/")),
    )


@dataclass
class Api:
    client: TestClient[Any, Any]
    etcd: Etcd
    luns: LunMap

    async def call(
        self, method: str, path: str, body: Any = None, role: str | None = "admin", **kw: Any
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {TOKENS[role]}"} if role else {}
        if "data" not in kw and body is not None:
            kw["json"] = body
        resp = await self.client.request(method, path, headers=headers, **kw)
        text = await resp.text()
        if resp.content_type in ("application/json", "application/problem+json") and text:
            return resp.status, await resp.json(content_type=None)
        return resp.status, text

    async def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        got, out = await self.call(method, path, body)
        assert got == status, (got, out)
        return out

    async def volume(self, name: str, size: int = 1 << 30, **extra: Any) -> dict[str, Any]:
        body = {"name": name, "size_bytes": size, **extra}
        got, out = await self.call("POST", "/v1/volumes", body)
        assert got in (200, 201), out
        return dict(out)


async def start_api(
    config: MetaConfig, instance_id: str | None = None
) -> tuple[TestClient[Any, Any], Etcd, LunMap]:
    """Meta's API in this process; `instance_id` as `LunMap` takes it (None: the LUN map
    follows every deletion, as if other instances were always live)."""
    etcd = await Etcd.connect(etcd_client_config(config.etcd))
    luns = await LunMap(etcd, instance_id).start()

    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    client: TestClient[Any, Any] = TestClient(ServedApp(make_app(config, etcd, health, luns)))
    await client.start_server()
    return client, etcd, luns


@contextlib.asynccontextmanager
async def running_api(config: MetaConfig, instance_id: str | None = None) -> AsyncIterator[Api]:
    """`start_api`'s instance, stopped (client, LUN map, etcd) on the way out."""
    client, etcd, luns = await start_api(config, instance_id)
    try:
        yield Api(client, etcd, luns)
    finally:
        await client.close()
        await luns.stop()
        await etcd.close()


@pytest.fixture
async def api(etcd_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[Api]:
    async with running_api(meta_config(etcd_server, etcd_prefix)) as instance:
        yield instance


async def register_chunk(
    etcd: Etcd,
    chunk_id: str,
    zone: str = "z1",
    up: bool = True,
    capacity: int = 100 << 30,
    free: int = 60 << 30,
    state: str = "up",
) -> None:
    """Write what a chunk server writes about itself (its registration and live status)."""
    portal = f"127.0.0.1:{3260 + len(chunk_id) % 7}"
    info = ChunkServerInfo(id=chunk_id, portal=portal, zone=zone, registered_at=time.time())
    await etcd.put(Keys.chunk(chunk_id), info.to_json())
    if up:
        status = ChunkServerStatus(
            id=chunk_id,
            portal=portal,
            zone=zone,
            state=state,
            data_dirs=[{"path": "/d", "capacity": capacity, "free": free}],
        )
        await etcd.put(Keys.live_chunk(chunk_id), status.to_json())


@dataclass
class MetaProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    etcd_endpoint: str
    namespace: str


def run_meta(etcd_server: EtcdServer, prefix: str, tmp: Path, **settings: Any) -> MetaProcess:
    """`lunastor-meta` as a real process; `settings` override the config (e.g. TLS)."""
    listen = f"127.0.0.1:{free_port()}"
    config = {
        "listen": listen,
        "portal": PORTAL,
        "lease_ttl": 2,
        "secret_key": SECRET_KEY,
        "planner_interval": 0.2,
        "auth": {
            "admin_tokens": [TOKENS["admin"]],
            "csi_tokens": [TOKENS["csi"]],
            "reader_tokens": [TOKENS["reader"]],
        },
        "etcd": {"endpoints": [etcd_server.endpoint], "namespace": prefix.rstrip("/")},
        "log": {"level": "warning"},
        **settings,
    }
    path = tmp / "meta.toml"
    path.write_text(to_toml_table(config))
    log = tmp / "meta.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lunastor.meta.main", "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    scheme = "https" if settings.get("tls_cert") else "http"
    return MetaProcess(f"{scheme}://{listen}", proc, log, etcd_server.endpoint, prefix.rstrip("/"))


def healthy(url: str, context: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(f"{url}/healthz", timeout=2, context=context) as resp:
        return resp.status == 200


def stop_meta(meta: MetaProcess) -> int:
    meta.proc.terminate()
    return meta.proc.wait(timeout=20)


@pytest.fixture
def meta_process(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> Iterator[MetaProcess]:
    meta = run_meta(etcd_server, etcd_prefix, tmp_path)
    try:
        wait_for(lambda: healthy(meta.url), 30, f"meta at {meta.url}; see {meta.log}")
        yield meta
    finally:
        assert stop_meta(meta) == 0, meta.log.read_text()
