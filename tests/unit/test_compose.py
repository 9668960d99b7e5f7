"""docker-compose.yml and Dockerfile cannot rot silently: besides running them (tests/compose,
`make compose-test`, which needs a Docker engine), the compose file is checked here against the
real entry points and configuration classes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from lunastor.chunk.config import ChunkConfig
from lunastor.common.config import env_paths, env_var_name, load_config
from lunastor.common.daemon import parse_hostport
from lunastor.meta.config import MetaConfig
from lunastor.redirector.config import RedirectorConfig

ROOT = Path(__file__).resolve().parents[2]
NOT_LUNASTOR = {"etcd", "client"}  # Debian's etcd; the iSCSI client host
CONFIG_CLASSES = {
    "lunastor-meta": MetaConfig,
    "lunastor-chunk": ChunkConfig,
    "lunastor-redirector": RedirectorConfig,
}


def interpolate(value: Any) -> Any:
    """Compose's `${VAR:-default}`, with every variable unset."""
    if isinstance(value, str):
        return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = interpolate(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))
    return data


def _scripts() -> dict[str, str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts: dict[str, str] = pyproject["project"]["scripts"]
    return scripts


def test_services_are_the_dev_cluster(compose: dict[str, Any]) -> None:
    services = compose["services"]
    expected = {"meta", "chunk1", "chunk2", "chunk3", "redirector1", "redirector2"}
    assert set(services) == expected | NOT_LUNASTOR
    kinds = {name: svc["command"][0] for name, svc in services.items() if name in expected}
    assert kinds == {
        "meta": "lunastor-meta",
        "chunk1": "lunastor-chunk",
        "chunk2": "lunastor-chunk",
        "chunk3": "lunastor-chunk",
        "redirector1": "lunastor-redirector",
        "redirector2": "lunastor-redirector",
    }
    assert services["client"]["profiles"] == ["client"], "the client starts only on request"


def test_commands_are_installed_entry_points(compose: dict[str, Any]) -> None:
    scripts = _scripts()
    for name, svc in compose["services"].items():
        if name in NOT_LUNASTOR:
            continue
        command = svc["command"][0]
        assert command in scripts, f"{name}: {command} is not a console script"
        module, _, func = scripts[command].partition(":")
        imported = __import__(module, fromlist=[func])
        assert callable(getattr(imported, func)), f"{name}: {scripts[command]} is not callable"


def _config_for(svc: dict[str, Any]) -> Any:
    env = {k: str(v) for k, v in svc["environment"].items()}
    unknown = [k for k in env if not k.startswith("LUNASTOR_")]
    assert unknown == []
    cls = CONFIG_CLASSES[svc["command"][0]]
    # load_config ignores environment variables that are not settings: check every name
    known = {env_var_name(p) for p in env_paths(cls)}
    assert set(env) <= known, f"unknown settings: {sorted(set(env) - known)}"
    return load_config(cls, env=env)


def test_environment_is_valid_configuration(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if name in NOT_LUNASTOR:
            continue
        config = _config_for(svc)
        assert config.etcd.endpoints == ["etcd:2379"], name
        assert svc["healthcheck"]["test"][:2] == ["CMD", "curl"], name


def test_data_path_is_on_with_shared_secrets(compose: dict[str, Any]) -> None:
    """Without cluster_secret a chunk server only registers (no iSCSI, no data port); the
    sealing key must be meta's everywhere, or CHAP secrets cannot be opened."""
    services = compose["services"]
    meta = _config_for(services["meta"])
    assert meta.secret_key
    chunks = [_config_for(services[n]) for n in ("chunk1", "chunk2", "chunk3")]
    assert {c.cluster_secret for c in chunks} != {""}
    assert len({c.cluster_secret for c in chunks}) == 1
    assert {c.secret_key for c in chunks} == {meta.secret_key}
    assert {c.zone for c in chunks} == {"zone1", "zone2", "zone3"}
    for name in ("redirector1", "redirector2"):
        assert _config_for(services[name]).secret_key == meta.secret_key


def test_ports_and_volumes_match_configuration(compose: dict[str, Any]) -> None:
    services = compose["services"]
    meta = _config_for(services["meta"])
    port = parse_hostport(meta.listen, "listen")[1]
    assert f"127.0.0.1:8080:{port}" in services["meta"]["ports"], "the API on the host's loopback"
    for name in ("chunk1", "chunk2", "chunk3"):
        svc = services[name]
        chunk = _config_for(svc)
        mounts = {v.split(":", 1)[1] for v in svc["volumes"]}
        assert set(chunk.data_dirs) <= mounts, f"{name}: data dirs must be volumes"
        ip = svc["networks"]["lunastor"]["ipv4_address"]
        assert chunk.portal == f"{ip}:3260"
        assert chunk.data_address == f"{ip}:3270"
    for name in ("redirector1", "redirector2"):
        redirector = _config_for(services[name])
        assert meta.portal == redirector.portal, "publish must hand out the redirector's VIP"
        assert redirector.manage_vip and "NET_ADMIN" in services[name]["cap_add"]
        subnet = compose["networks"]["lunastor"]["ipam"]["config"]
        assert redirector.vip.rsplit(".", 1)[0] == subnet[0]["subnet"].rsplit(".", 1)[0]
    etcd_cmd = " ".join(services["etcd"]["command"])
    assert "--advertise-client-urls=http://etcd:2379" in etcd_cmd


def test_dockerfile_installs_the_package() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY lunastor ./lunastor" in dockerfile
    assert "pip install" in dockerfile
    assert dockerfile.startswith("#")
    assert "ARG BASE_IMAGE=debian:bookworm-slim\nFROM ${BASE_IMAGE}\n" in dockerfile


def test_every_image_builds_from_the_same_base(compose: dict[str, Any]) -> None:
    """scripts/docker-base-image.sh makes one base image where none can be pulled: every
    Dockerfile the compose file builds starts from it."""
    for name, svc in compose["services"].items():
        build = svc["build"]
        assert build["args"]["BASE_IMAGE"] == "debian:bookworm-slim", name
        path = ROOT / build["context"] / build.get("dockerfile", "Dockerfile")
        assert "FROM ${BASE_IMAGE}" in path.read_text(), path
