"""Chunk server configuration (TOML file, LUNASTOR_* environment, --set flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lunastor.common.config import ConfigError, EtcdSettings, LogSettings
from lunastor.common.daemon import format_hostport, parse_hostport


@dataclass
class ChunkConfig:
    data_dirs: list[str] = field(default_factory=lambda: ["/var/lib/lunastor/chunk"])
    zone: str = "default"  # failure domain: placement spreads replicas over zones
    iscsi_listen: str = "0.0.0.0:3260"
    iscsi_advertise: str = ""  # what initiators are told; defaults to iscsi_listen
    data_listen: str = "0.0.0.0:3270"  # chunk-to-chunk replication port
    data_advertise: str = ""
    admin_listen: str = "127.0.0.1:9100"  # /metrics and /healthz
    lease_ttl: float = 5.0  # seconds without a heartbeat before the cluster calls us down
    status_interval: float = 10.0  # how often capacity is refreshed in etcd
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    log: LogSettings = field(default_factory=LogSettings)

    def validate(self) -> None:
        if not self.data_dirs:
            raise ConfigError("data_dirs: at least one data directory is required")
        for name in ("iscsi_listen", "data_listen", "admin_listen"):
            parse_hostport(getattr(self, name), name)
        for name in ("iscsi_advertise", "data_advertise"):
            value = getattr(self, name)
            if value:
                host, _ = parse_hostport(value, name)
                if host in ("0.0.0.0", "::"):
                    raise ConfigError(f"{name}: a wildcard address cannot be advertised")
        if not 1 <= self.lease_ttl <= 300:
            raise ConfigError(f"lease_ttl: expected 1..300 seconds, got {self.lease_ttl}")
        if self.status_interval <= 0:
            raise ConfigError("status_interval: must be positive")

    def advertised(self, listen: str, advertise: str, what: str) -> str:
        if advertise:
            return advertise
        host, port = parse_hostport(listen, what)
        if host in ("0.0.0.0", "::", ""):
            raise ConfigError(
                f"{what}: listening on a wildcard address needs an explicit "
                f"{what.replace('listen', 'advertise')} address"
            )
        return format_hostport(host, port)

    @property
    def portal(self) -> str:
        return self.advertised(self.iscsi_listen, self.iscsi_advertise, "iscsi_listen")

    @property
    def data_address(self) -> str:
        return self.advertised(self.data_listen, self.data_advertise, "data_listen")
