"""docker-compose.yml and Dockerfile cannot rot silently: no container engine runs here, so the
compose file is checked against the real entry points and configuration classes."""

from __future__ import annotations

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
CONFIG_CLASSES = {
    "lunastor-meta": MetaConfig,
    "lunastor-chunk": ChunkConfig,
    "lunastor-redirector": RedirectorConfig,
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _scripts() -> dict[str, str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts: dict[str, str] = pyproject["project"]["scripts"]
    return scripts


def test_services_are_the_dev_cluster(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"etcd", "meta", "chunk1", "chunk2", "chunk3", "redirector"}
    kinds = {name: svc["command"][0] for name, svc in services.items() if name != "etcd"}
    assert kinds == {
        "meta": "lunastor-meta",
        "chunk1": "lunastor-chunk",
        "chunk2": "lunastor-chunk",
        "chunk3": "lunastor-chunk",
        "redirector": "lunastor-redirector",
    }


def test_commands_are_installed_entry_points(compose: dict[str, Any]) -> None:
    scripts = _scripts()
    for name, svc in compose["services"].items():
        if name == "etcd":
            continue
        command = svc["command"][0]
        assert command in scripts, f"{name}: {command} is not a console script"
        module, _, func = scripts[command].partition(":")
        imported = __import__(module, fromlist=[func])
        assert callable(getattr(imported, func)), f"{name}: {scripts[command]} is not callable"


def _config_for(svc: dict[str, Any]) -> Any:
    env = {k: str(v) for k, v in svc["environment"].items()}
    # ${VAR:-default} is compose interpolation; use its default
    env = {
        k: (v.split(":-", 1)[1].rstrip("}") if v.startswith("${") else v) for k, v in env.items()
    }
    unknown = [k for k in env if not k.startswith("LUNASTOR_")]
    assert unknown == []
    cls = CONFIG_CLASSES[svc["command"][0]]
    # load_config ignores environment variables that are not settings: check every name
    known = {env_var_name(p) for p in env_paths(cls)}
    assert set(env) <= known, f"unknown settings: {sorted(set(env) - known)}"
    return load_config(cls, env=env)


def test_environment_is_valid_configuration(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if name == "etcd":
            continue
        config = _config_for(svc)
        assert config.etcd.endpoints == ["etcd:2379"], name


def test_ports_and_volumes_match_configuration(compose: dict[str, Any]) -> None:
    services = compose["services"]
    meta = _config_for(services["meta"])
    assert f"{parse_hostport(meta.listen, 'listen')[1]}:8080" in services["meta"]["ports"]
    for name in ("chunk1", "chunk2", "chunk3"):
        svc = services[name]
        chunk = _config_for(svc)
        mounts = {v.split(":", 1)[1] for v in svc["volumes"]}
        assert set(chunk.data_dirs) <= mounts, f"{name}: data dirs must be volumes"
        ip = svc["networks"]["lunastor"]["ipv4_address"]
        assert chunk.portal == f"{ip}:3260"
        assert chunk.data_address == f"{ip}:3270"
    redirector = _config_for(services["redirector"])
    assert meta.portal == redirector.portal, "publish must hand out the redirector's VIP"
    assert redirector.manage_vip and "NET_ADMIN" in services["redirector"]["cap_add"]
    etcd_cmd = " ".join(services["etcd"]["command"])
    assert "--advertise-client-urls=http://etcd:2379" in etcd_cmd


def test_dockerfile_installs_the_package() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY lunastor ./lunastor" in dockerfile
    assert "pip install" in dockerfile
    assert dockerfile.startswith("#") and "FROM python:3.11" in dockerfile
