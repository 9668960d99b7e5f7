"""The one config source: defaults < TOML file < environment < --set flags, with precise errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lunastor.chunk.config import ChunkConfig
from lunastor.common.config import ConfigError, load_config, to_toml
from lunastor.meta.config import MetaConfig
from lunastor.redirector.config import RedirectorConfig


def test_defaults_validate() -> None:
    for cls in (ChunkConfig, MetaConfig, RedirectorConfig):
        load_config(cls, env={})


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "chunk.toml"
    path.write_text('zone = "file"\nlease_ttl = 7\n[etcd]\nendpoints = ["a:1", "b:2"]\n')
    cfg = load_config(ChunkConfig, path, env={})
    assert (cfg.zone, cfg.lease_ttl, cfg.etcd.endpoints) == ("file", 7.0, ["a:1", "b:2"])
    env = {"LUNASTOR_ZONE": "env", "LUNASTOR_ETCD__ENDPOINTS": "c:3,d:4"}
    cfg = load_config(ChunkConfig, path, env=env)
    assert (cfg.zone, cfg.etcd.endpoints) == ("env", ["c:3", "d:4"])
    cfg = load_config(ChunkConfig, path, env=env, overrides=["zone=flag", "etcd.timeout=2.5"])
    assert (cfg.zone, cfg.etcd.timeout, cfg.lease_ttl) == ("flag", 2.5, 7.0)


def test_round_trip_through_toml(tmp_path: Path) -> None:
    cfg = load_config(
        MetaConfig, env={}, overrides=["auth.admin_tokens=t1,t2", "portal=1.2.3.4:3260"]
    )
    path = tmp_path / "meta.toml"
    path.write_text(to_toml(cfg))
    assert load_config(MetaConfig, path, env={}) == cfg


@pytest.mark.parametrize(
    ("toml", "env", "overrides", "message"),
    [
        ("zonee = 'x'\n", {}, [], "zonee: unknown setting"),
        ("[etcd]\nendpoint = 'x'\n", {}, [], "etcd.endpoint: unknown setting"),
        ("lease_ttl = 'soon'\n", {}, [], "lease_ttl: expected a number"),
        ("lease_ttl = 1000\n", {}, [], "lease_ttl: expected 1..300"),
        ("", {"LUNASTOR_LEASE_TTL": "x"}, [], "lease_ttl: expected a number"),
        ("", {}, ["nonsense"], "expected KEY=VALUE"),
        ("", {}, ["etcd.nope=1"], "unknown setting 'etcd.nope'"),
        ("", {}, ["iscsi_listen=nowhere"], "iscsi_listen: expected HOST:PORT"),
        ("", {}, ["data_dirs="], "data_dirs: at least one"),
        ("not toml [", {}, [], "chunk.toml"),
        ("", {}, ["replace_after=-1"], "replace_after: must not be negative"),
        ("", {"LUNASTOR_REBUILD_RATE": "1000"}, [], "rebuild_rate: at least 1 MiB/s"),
        ("", {}, ["rebuild_concurrency=0"], "rebuild_concurrency: expected 1..64"),
        ("", {}, ["repair_interval=0"], "repair_interval: expected 0.05..3600"),
    ],
)
def test_errors_name_the_setting(
    tmp_path: Path, toml: str, env: dict[str, str], overrides: list[str], message: str
) -> None:
    path = tmp_path / "chunk.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(ChunkConfig, path, env=env, overrides=overrides)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ChunkConfig, tmp_path / "nope.toml", env={})


def test_wildcard_listen_needs_an_advertised_address() -> None:
    cfg = load_config(ChunkConfig, env={}, overrides=["iscsi_listen=0.0.0.0:3260"])
    with pytest.raises(ConfigError, match="iscsi_advertise"):
        _ = cfg.portal
    cfg = load_config(
        ChunkConfig,
        env={},
        overrides=["iscsi_listen=0.0.0.0:3260", "iscsi_advertise=10.0.0.5:3260"],
    )
    assert cfg.portal == "10.0.0.5:3260"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("etcd_history=0.5", "etcd_history: expected 0 (never compact) or 1..604800 seconds"),
        ("etcd_history=-1", "etcd_history: expected 0 (never compact) or 1..604800 seconds"),
        ("gc_batch=0", "gc_batch: expected 1..100000 extent versions, got 0"),
    ],
)
def test_meta_errors_name_the_setting(tmp_path: Path, override: str, message: str) -> None:
    path = tmp_path / "meta.toml"
    path.write_text("")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(MetaConfig, path, env={}, overrides=[override])
    load_config(MetaConfig, path, env={}, overrides=["etcd_history=0"])  # 0: never
