"""Each daemon as a real process against a real etcd: config errors, admin endpoints, records."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lunastor.common.config import to_toml_table
from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.records import ChunkServerInfo, ChunkServerStatus, Keys
from tests.support.etcd import EtcdServer
from tests.support.procs import free_port, wait_for


def _run_daemon(
    module: str, config: dict[str, Any], tmp: Path, name: str
) -> subprocess.Popen[bytes]:
    path = tmp / f"{name}.toml"
    path.write_text(to_toml_table(config))
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", module, "--config", str(path)], stdout=log, stderr=subprocess.STDOUT
    )


def _http(url: str, token: str = "") -> tuple[int, dict[str, Any] | str, dict[str, str]]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = resp.read().decode()
            status, headers = resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
        status, headers = exc.code, dict(exc.headers)
    try:
        return status, json.loads(body), headers
    except ValueError:
        return status, body, headers


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.terminate()
    return proc.wait(timeout=20)


@pytest.mark.parametrize(
    "module", ["lunastor.chunk.main", "lunastor.meta.main", "lunastor.redirector.main"]
)
def test_bad_configuration_is_one_clear_line(module: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("lease_ttl = 'soon'\n")
    proc = subprocess.run(
        [sys.executable, "-m", module, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("lease_ttl: expected a number, got 'soon'")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture
def etcd_settings(etcd_server: EtcdServer, etcd_prefix: str) -> dict[str, Any]:
    return {"endpoints": [etcd_server.endpoint], "namespace": etcd_prefix.rstrip("/")}


@pytest.fixture
def meta(tmp_path: Path, etcd_settings: dict[str, Any]) -> Iterator[str]:
    listen = f"127.0.0.1:{free_port()}"
    proc = _run_daemon(
        "lunastor.meta.main",
        {
            "listen": listen,
            "lease_ttl": 2,
            "auth": {"admin_tokens": ["admin-t"], "reader_tokens": ["reader-t"]},
            "etcd": etcd_settings,
        },
        tmp_path,
        "meta",
    )
    url = f"http://{listen}"
    wait_for(lambda: _http(f"{url}/healthz")[0] == 200, 30, "meta healthz")
    yield url
    assert _stop(proc) == 0


def test_meta_admin_endpoints_need_no_token_and_reveal_no_secrets(meta: str) -> None:
    status, body, _ = _http(f"{meta}/healthz")
    assert status == 200 and isinstance(body, dict) and body["status"] == "ok"
    status, text, _ = _http(f"{meta}/metrics")
    assert status == 200 and isinstance(text, str)
    assert 'lunastor_build_info{daemon="meta"' in text
    assert "lunastor_etcd_lease_held 1.0" in text
    assert "admin-t" not in json.dumps(body) + text


@pytest.mark.parametrize(
    ("token", "status", "code"),
    [
        ("", 401, "unauthenticated"),
        ("wrong", 401, "unauthenticated"),
    ],
)
def test_meta_refuses_missing_and_unknown_tokens(
    meta: str, token: str, status: int, code: str
) -> None:
    got, body, headers = _http(f"{meta}/v1/cluster", token)
    assert got == status
    assert isinstance(body, dict) and body["code"] == code and body["status"] == status
    assert headers["Content-Type"].startswith("application/problem+json")
    assert "Bearer" in headers.get("WWW-Authenticate", "")


def test_meta_unknown_path_is_a_json_problem(meta: str) -> None:
    status, body, _ = _http(f"{meta}/v1/nothing-here", "admin-t")
    assert status == 404 and isinstance(body, dict) and body["code"] == "not_found"


def test_chunk_server_registers_and_keeps_its_id(
    tmp_path: Path, etcd_settings: dict[str, Any], meta: str
) -> None:
    data = tmp_path / "data"
    host = "127.0.0.1"
    config = {
        "data_dirs": [str(data)],
        "zone": "z9",
        "lease_ttl": 2,
        "iscsi_listen": f"{host}:{free_port()}",
        "data_listen": f"{host}:{free_port()}",
        "admin_listen": f"{host}:{free_port()}",
        "etcd": etcd_settings,
    }
    proc = _run_daemon("lunastor.chunk.main", config, tmp_path, "chunk")
    try:
        wait_for(
            lambda: _http(f"http://{config['admin_listen']}/healthz")[0] == 200, 30, "chunk healthz"
        )
        chunk_id = (data / "chunk-id").read_text().strip()
        status, view, _ = _http(f"{meta}/v1/cluster", "reader-t")
        assert status == 200 and isinstance(view, dict)
        (entry,) = view["chunk_servers"]
        assert entry["id"] == chunk_id and entry["state"] == "up" and entry["zone"] == "z9"
        assert entry["portal"] == config["iscsi_listen"]
        assert entry["data_dirs"][0]["path"] == str(data)
    finally:
        assert _stop(proc) == 0

    async def records() -> tuple[Any, Any]:
        cfg = EtcdConfig(endpoints=etcd_settings["endpoints"], namespace=etcd_settings["namespace"])
        async with await Etcd.connect(cfg) as etcd:
            info = await etcd.get(Keys.chunk(chunk_id))
            live = await etcd.get(Keys.live_chunk(chunk_id))
            return info, live

    import asyncio

    info, live = asyncio.run(records())
    assert live is None, "a clean stop revokes the lease"
    assert ChunkServerInfo.from_json(info.value).portal == config["iscsi_listen"]
    # restarted, it is the same chunk server
    proc = _run_daemon("lunastor.chunk.main", config, tmp_path, "chunk2")
    try:
        wait_for(
            lambda: _http(f"http://{config['admin_listen']}/healthz")[0] == 200,
            30,
            "chunk healthz after restart",
        )
        _, live_after = asyncio.run(records())
        status_rec = ChunkServerStatus.from_json(live_after.value)
        assert status_rec.id == chunk_id and status_rec.lease == live_after.lease
    finally:
        assert _stop(proc) == 0


def test_a_chunk_server_started_before_etcd_waits_for_it(tmp_path: Path) -> None:
    """A chunk server whose etcd does not answer yet (a node booting before the etcd
    members, a whole cluster powered on at once) retries with backoff, then registers once
    etcd is up; stopped while it waits, it exits cleanly. It used to exit at once with an
    etcd error."""
    host = "127.0.0.1"
    etcd = EtcdServer(client_port=free_port(host))
    settings = {"endpoints": [etcd.endpoint], "namespace": "/late", "timeout": 1}

    def config(name: str) -> dict[str, Any]:
        return {
            "data_dirs": [str(tmp_path / name)],
            "lease_ttl": 2,
            "iscsi_listen": f"{host}:{free_port()}",
            "data_listen": f"{host}:{free_port()}",
            "admin_listen": f"{host}:{free_port()}",
            "etcd": settings,
        }

    def retried(name: str) -> bool:
        return "etcd does not answer yet" in (tmp_path / f"{name}.log").read_text()

    stopped = _run_daemon("lunastor.chunk.main", config("a"), tmp_path, "a")
    try:
        wait_for(lambda: retried("a"), 30, "a retry")
        assert stopped.poll() is None
    finally:
        assert _stop(stopped) == 0
    waiting = config("b")
    proc = _run_daemon("lunastor.chunk.main", waiting, tmp_path, "b")
    try:
        wait_for(lambda: retried("b"), 30, "a retry")
        time.sleep(3)  # several attempts
        assert proc.poll() is None, "still waiting for etcd"
        etcd.start()
        try:
            healthz = f"http://{waiting['admin_listen']}/healthz"
            wait_for(lambda: _http(healthz)[0] == 200, 60, "chunk healthz once etcd is up")
        finally:
            assert _stop(proc) == 0
    finally:
        etcd.cleanup()
