"""Meta service configuration (TOML file, LUNASTOR_* environment, --set flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lunastor.common.config import ConfigError, EtcdSettings, LogSettings
from lunastor.common.daemon import parse_hostport


@dataclass
class AuthSettings:
    """Bearer tokens per role. admin: everything; csi: volumes, exports, snapshots; reader: GETs."""

    admin_tokens: list[str] = field(default_factory=list)
    csi_tokens: list[str] = field(default_factory=list)
    reader_tokens: list[str] = field(default_factory=list)

    def role_of(self, token: str) -> str | None:
        for role in ("admin", "csi", "reader"):
            if token in getattr(self, f"{role}_tokens"):
                return role
        return None


@dataclass
class MetaConfig:
    id: str = ""  # instance id; defaults to host:port of `listen`
    listen: str = "127.0.0.1:8080"  # REST API, /metrics and /healthz
    advertise_url: str = ""  # how clients reach this instance; defaults to http://<listen>
    portal: str = "127.0.0.1:3260"  # the redirector VIP portal handed out on publish
    lease_ttl: float = 5.0
    tls_cert: str = ""  # serve HTTPS when both are set
    tls_key: str = ""
    secret_key: str = ""  # seals CHAP secrets in etcd; at least 16 characters when set
    planner_interval: float = 5.0  # seconds between background planner passes
    gc_batch: int = 256  # extent versions the GC frees per planner pass (gc.py)
    # seconds of etcd's key history kept; older revisions are compacted (compaction.py); 0:
    # never (etcd's own --auto-compaction-* does it)
    etcd_history: float = 300.0
    # rebalancing (docs/placement.md): moves outstanding in the cluster (0: never move data)
    # and per chunk server, as source or target
    rebalance_max_moves: int = 16
    rebalance_per_server: int = 2
    auth: AuthSettings = field(default_factory=AuthSettings)
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    log: LogSettings = field(default_factory=LogSettings)

    def validate(self) -> None:
        parse_hostport(self.listen, "listen")
        parse_hostport(self.portal, "portal")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key must be set together")
        if self.secret_key and len(self.secret_key) < 16:
            raise ConfigError("secret_key: at least 16 characters")
        if not 0.05 <= self.planner_interval <= 3600:
            raise ConfigError(
                f"planner_interval: expected 0.05..3600 seconds, got {self.planner_interval}"
            )
        if not 1 <= self.gc_batch <= 100_000:
            raise ConfigError(f"gc_batch: expected 1..100000 extent versions, got {self.gc_batch}")
        if self.etcd_history != 0 and not 1 <= self.etcd_history <= 7 * 86400:
            raise ConfigError(
                f"etcd_history: expected 0 (never compact) or 1..604800 seconds, got "
                f"{self.etcd_history}"
            )
        if not 0 <= self.rebalance_max_moves <= 10_000:
            raise ConfigError(
                f"rebalance_max_moves: expected 0..10000, got {self.rebalance_max_moves}"
            )
        if not 1 <= self.rebalance_per_server <= 1000:
            raise ConfigError(
                f"rebalance_per_server: expected 1..1000, got {self.rebalance_per_server}"
            )
        if not 1 <= self.lease_ttl <= 300:
            raise ConfigError(f"lease_ttl: expected 1..300 seconds, got {self.lease_ttl}")

    @property
    def instance_id(self) -> str:
        return self.id or self.listen

    @property
    def api_url(self) -> str:
        if self.advertise_url:
            return self.advertise_url
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://{self.listen}"
