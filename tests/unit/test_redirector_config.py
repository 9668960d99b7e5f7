"""Redirector settings: the VIP release margin, the sealing key and the login timeout."""

from __future__ import annotations

import pytest

from lunastor.common.config import ConfigError, load_config
from lunastor.redirector.config import RedirectorConfig


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["vip_release_margin=-1"], r"vip_release_margin: expected 0 \(automatic\)"),
        (["lease_ttl=2", "vip_release_margin=1.5"], r"at most lease_ttl/2 \(1 s\), got 1.5"),
        (["secret_key=short"], "secret_key: at least 16 characters"),
        (["login_timeout=0"], "login_timeout: must be positive"),
        (["vip=10.0.0.300"], "vip: not an IP address"),
    ],
)
def test_bad_settings_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(RedirectorConfig, None, env={}, overrides=overrides)


@pytest.mark.parametrize(
    ("overrides", "margin"),
    [
        ([], 1.0),  # automatic: min(1 s, lease_ttl / 4), lease_ttl 5
        (["lease_ttl=2"], 0.5),
        (["lease_ttl=1"], 0.25),
        (["lease_ttl=2", "vip_release_margin=1"], 1.0),
        (["lease_ttl=10", "vip_release_margin=2.5"], 2.5),
    ],
)
def test_good_margins(overrides: list[str], margin: float) -> None:
    config = load_config(RedirectorConfig, None, env={}, overrides=overrides)
    assert config.release_margin == margin
