"""`lunastor-meta` as a real process: TLS, the planner election across two instances."""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.records import Keys
from tests.integration.meta.conftest import (
    TOKENS,
    MetaProcess,
    healthy,
    register_chunk,
    run_meta,
    stop_meta,
)
from tests.support.etcd import EtcdServer
from tests.support.procs import wait_for
from tests.support.tls import self_signed


def test_meta_serves_https_when_tls_is_configured(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    meta = run_meta(etcd_server, etcd_prefix, tmp_path, tls_cert=str(cert), tls_key=str(key))
    try:
        context = ssl.create_default_context(cafile=str(cert))
        wait_for(lambda: healthy(meta.url, context), 30, f"meta over TLS; see {meta.log}")
        assert meta.url.startswith("https://")
        req = urllib.request.Request(
            f"{meta.url}/v1/volumes",
            data=json.dumps({"name": "tls-vol", "size_bytes": 1 << 20}).encode(),
            headers={"Authorization": f"Bearer {TOKENS['csi']}"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5, context=context) as resp:
            assert resp.status == 201
        # Plain HTTP to the TLS port gets no API answer.
        plain = meta.url.replace("https://", "http://")
        try:
            urllib.request.urlopen(f"{plain}/healthz", timeout=5)
            raise AssertionError("plain HTTP must not be served on the TLS port")
        except (OSError, urllib.error.URLError):
            pass
    finally:
        assert stop_meta(meta) == 0


def test_bad_tls_files_stop_meta_with_one_line(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    missing = str(tmp_path / "nope.pem")
    meta = run_meta(etcd_server, etcd_prefix, tmp_path, tls_cert=missing, tls_key=missing)
    assert meta.proc.wait(timeout=30) == 1
    lines = meta.log.read_text().strip().splitlines()
    assert lines[-1].startswith("lunastor-meta: cannot start: tls_cert")


def test_two_instances_serve_and_one_runs_the_planners(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path, meta_process: MetaProcess
) -> None:
    (tmp_path / "second").mkdir()
    second = run_meta(etcd_server, etcd_prefix, tmp_path / "second")
    try:
        wait_for(lambda: healthy(second.url), 30, f"second meta; see {second.log}")

        def call(url: str, method: str, path: str, body: object = None) -> tuple[int, Any]:
            req = urllib.request.Request(
                url + path,
                data=None if body is None else json.dumps(body).encode(),
                headers={"Authorization": f"Bearer {TOKENS['admin']}"},
                method=method,
            )
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    return resp.status, json.loads(resp.read() or b"{}")
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read() or b"{}")

        body = {"name": "shared", "size_bytes": 1 << 30}
        status1, vol1 = call(meta_process.url, "POST", "/v1/volumes", body)
        status2, vol2 = call(second.url, "POST", "/v1/volumes", body)
        assert (status1, status2) == (201, 200) and vol1 == vol2
        # The drain completes with no test hook: one instance leads the planners.
        asyncio.run(_register(meta_process, "chunk-0000000000f1"))
        status, op = call(meta_process.url, "POST", "/v1/chunks/chunk-0000000000f1/drain")
        assert status == 202
        wait_for(
            lambda: (
                call(second.url, "GET", f"/v1/operations/{op['id']}")[1]["state"] == "succeeded"
            ),
            15,
            "the drain operation to complete",
        )
        candidates = asyncio.run(_candidates(meta_process))
        assert len(candidates) == 2  # both campaign; the older one leads
    finally:
        assert stop_meta(second) == 0


async def _register(meta: MetaProcess, chunk_id: str) -> None:
    config = EtcdConfig(endpoints=[meta.etcd_endpoint], namespace=meta.namespace)
    async with await Etcd.connect(config) as etcd:
        await register_chunk(etcd, chunk_id)


async def _candidates(meta: MetaProcess) -> list[str]:
    config = EtcdConfig(endpoints=[meta.etcd_endpoint], namespace=meta.namespace)
    async with await Etcd.connect(config) as etcd:
        kvs, _ = await etcd.get_prefix(Keys.PLANNER_ELECTION + "/")
        return [kv.value.decode() for kv in kvs]
