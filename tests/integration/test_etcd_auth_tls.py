"""etcd authentication and TLS, configured the way daemons configure them, on real servers."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunastor.common.etcd import (
    Etcd,
    EtcdAuthError,
    EtcdConfig,
    EtcdConfigError,
    EtcdPermissionDenied,
    EtcdTlsError,
    LeaseKeeper,
    PrefixCache,
)
from tests.integration.etcd_cluster import EtcdCluster, make_tls_files
from tests.support.etcd import EtcdServer


def _etcdctl(endpoint: str, *args: str, user: str | None = None) -> None:
    cmd = ["etcdctl", f"--endpoints={endpoint}", *([f"--user={user}"] if user else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=20, env={"ETCDCTL_API": "3"})


@pytest.fixture(scope="module")
def auth_server() -> Iterator[EtcdServer]:
    """An etcd with auth on: root (role root) and app, who may only touch /app/."""
    server = EtcdServer().start()
    ep = server.endpoint
    _etcdctl(ep, "user", "add", "root:rootpw")
    _etcdctl(ep, "user", "grant-role", "root", "root")
    _etcdctl(ep, "role", "add", "app")
    _etcdctl(ep, "role", "grant-permission", "app", "readwrite", "--prefix=true", "/app/")
    _etcdctl(ep, "user", "add", "app:apppw")
    _etcdctl(ep, "user", "grant-role", "app", "app")
    _etcdctl(ep, "auth", "enable")
    yield server
    server.cleanup()


async def test_authenticated_client_reads_writes_watches_and_keeps_leases(
    auth_server: EtcdServer,
) -> None:
    config = EtcdConfig(
        [auth_server.endpoint], namespace="/app/", user="root", password="rootpw", timeout=2
    )
    async with (
        await Etcd.connect(config) as etcd,
        LeaseKeeper(config, 2) as keeper,
        PrefixCache(etcd, "chunk/") as cache,
    ):
        rev = await etcd.put("chunk/1", b"up", lease=keeper.lease_id)
        await cache.wait_for_revision(rev, timeout=5)
        assert cache.get("chunk/1").value == b"up"  # type: ignore[union-attr]


async def test_wrong_password_is_a_clear_auth_error(auth_server: EtcdServer) -> None:
    config = EtcdConfig([auth_server.endpoint], user="root", password="wrong", timeout=2)
    with pytest.raises(EtcdAuthError, match="invalid user ID or password"):
        await Etcd.connect(config)
    with pytest.raises(EtcdAuthError, match="invalid user ID or password"):
        await LeaseKeeper(config, 2).start()


async def test_missing_credentials_and_missing_permissions(auth_server: EtcdServer) -> None:
    async with await Etcd.connect(EtcdConfig([auth_server.endpoint], timeout=2)) as anonymous:
        with pytest.raises(EtcdAuthError):
            await anonymous.put("/app/x", b"1")
    config = EtcdConfig([auth_server.endpoint], user="app", password="apppw", timeout=2)
    async with await Etcd.connect(config) as app:
        await app.put("/app/x", b"1")
        assert (await app.get("/app/x")).value == b"1"  # type: ignore[union-attr]
        with pytest.raises(EtcdPermissionDenied):
            await app.put("/other/x", b"1")
        with pytest.raises(EtcdPermissionDenied):
            await app.get_prefix("/other/")
        with pytest.raises(EtcdPermissionDenied):
            await anext(aiter(app.watch_prefix("/other/", 1)))


async def test_expired_auth_token_is_renewed() -> None:
    cluster = EtcdCluster(1, extra_args=["--auth-token-ttl", "1"]).start()
    try:
        ep = cluster.endpoints[0]
        _etcdctl(ep, "user", "add", "root:rootpw")
        _etcdctl(ep, "user", "grant-role", "root", "root")
        _etcdctl(ep, "auth", "enable")
        config = EtcdConfig([ep], user="root", password="rootpw", timeout=2)
        async with await Etcd.connect(config) as etcd:
            await etcd.put("k", b"1")
            token = etcd._conn.metadata if etcd._conn else None
            # The point of this test: stay idle past the token's 1 s TTL (etcd checks expiry
            # about once a second), so the next request carries an expired token.
            await asyncio.sleep(2.5)
            assert (await etcd.get("k")).value == b"1"  # type: ignore[union-attr]
            assert etcd._conn is not None and etcd._conn.metadata != token
    finally:
        cluster.cleanup()


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_cluster(tls_dir: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(1, tls=tls_dir).start()
    yield cluster
    cluster.cleanup()


def _tls_config(cluster: EtcdCluster, d: Path, **kw: str | None) -> EtcdConfig:
    files: dict[str, str | None] = {
        "ca_cert": str(d / "ca.crt"),
        "cert": str(d / "client.crt"),
        "key": str(d / "client.key"),
    }
    files.update(kw)
    return EtcdConfig(cluster.endpoints, namespace="/tls/", timeout=2, **files)


async def test_tls_with_client_certificate(tls_cluster: EtcdCluster, tls_dir: Path) -> None:
    config = _tls_config(tls_cluster, tls_dir)
    async with (
        await Etcd.connect(config) as etcd,
        LeaseKeeper(config, 2) as keeper,
        PrefixCache(etcd, "") as cache,
    ):
        rev = await etcd.put("k", b"over tls", lease=keeper.lease_id)
        await cache.wait_for_revision(rev, timeout=5)
        assert cache.get("k").value == b"over tls"  # type: ignore[union-attr]


async def test_tls_refuses_an_unknown_ca_and_a_missing_client_cert(
    tls_cluster: EtcdCluster, tls_dir: Path
) -> None:
    other_ca = str(tls_dir / "other-ca.crt")
    with pytest.raises(EtcdTlsError):
        await Etcd.connect(_tls_config(tls_cluster, tls_dir, ca_cert=other_ca))
    with pytest.raises(EtcdTlsError):
        await Etcd.connect(_tls_config(tls_cluster, tls_dir, cert=None, key=None))


def test_unreadable_tls_file_is_a_config_error(tmp_path: Path) -> None:
    config = EtcdConfig(["127.0.0.1:2379"], ca_cert=str(tmp_path / "missing.crt"))
    with pytest.raises(EtcdConfigError, match=r"missing\.crt"):
        config.credentials()
