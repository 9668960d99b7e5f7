"""Redirector configuration (TOML file, LUNASTOR_* environment, --set flags)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from lunastor.common.config import ConfigError, EtcdSettings, LogSettings
from lunastor.common.daemon import parse_hostport


@dataclass
class RedirectorConfig:
    id: str = ""  # instance id; defaults to the host name
    vip: str = "127.0.0.100"  # the portal address only the leader holds
    portal_port: int = 3260
    interface: str = "lo"  # where the leader adds the VIP (when manage_vip is on)
    manage_vip: bool = False  # add/remove the VIP with `ip addr`; off on loopback dev clusters
    admin_listen: str = "127.0.0.1:9101"
    lease_ttl: float = 5.0
    # A leader that cannot renew its lease drops the VIP this long before its lease could
    # expire in etcd (docs/redirector.md, "Failover"): etcd elects the next leader only after
    # expiry, so two hosts never hold the VIP at once. 0: min(1 s, lease_ttl / 4).
    vip_release_margin: float = 0.0
    secret_key: str = ""  # opens sealed discovery CHAP secrets; the same key as meta's
    login_timeout: float = 15.0  # a portal connection must finish its login within this
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    log: LogSettings = field(default_factory=LogSettings)

    def validate(self) -> None:
        try:
            ipaddress.ip_address(self.vip)
        except ValueError:
            raise ConfigError(f"vip: not an IP address: {self.vip!r}") from None
        if not 1 <= self.portal_port <= 65535:
            raise ConfigError(f"portal_port: out of range: {self.portal_port}")
        parse_hostport(self.admin_listen, "admin_listen")
        if not 1 <= self.lease_ttl <= 300:
            raise ConfigError(f"lease_ttl: expected 1..300 seconds, got {self.lease_ttl}")
        # keep-alives go out every ttl/3, so a healthy lease has at least 2/3 ttl left
        margin = self.vip_release_margin
        if margin != 0 and not 0 < margin <= self.lease_ttl / 2:
            raise ConfigError(
                f"vip_release_margin: expected 0 (automatic) or more than 0 and at most "
                f"lease_ttl/2 ({self.lease_ttl / 2:g} s), got {margin}"
            )
        if self.secret_key and len(self.secret_key) < 16:
            raise ConfigError("secret_key: at least 16 characters")
        if self.login_timeout <= 0:
            raise ConfigError("login_timeout: must be positive")

    @property
    def release_margin(self) -> float:
        """`vip_release_margin`, or its automatic value when 0."""
        return self.vip_release_margin or min(1.0, self.lease_ttl / 4)

    @property
    def instance_id(self) -> str:
        return self.id or socket.gethostname()

    @property
    def portal(self) -> str:
        host = f"[{self.vip}]" if ":" in self.vip else self.vip
        return f"{host}:{self.portal_port}"
