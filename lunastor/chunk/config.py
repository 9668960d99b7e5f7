"""Chunk server configuration (TOML file, LUNASTOR_* environment, --set flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lunastor.chunk.workers import MAX_WORKERS, worker_address
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
    # A guard process revokes our lease the moment this process exits, however it exits, so
    # a crash is seen at once instead of after lease_ttl (lunastor/chunk/guard.py).
    crash_guard: bool = True
    status_interval: float = 10.0  # how often capacity is refreshed in etcd
    # The data path (docs/datapath.md). Without cluster_secret the server only registers: it
    # serves neither the data port nor iSCSI (no unauthenticated path to data).
    cluster_secret: str = ""  # shared by every chunk server: authenticates the data port
    secret_key: str = ""  # meta's sealing key, to open CHAP secrets from etcd
    extent_size: int = 64 * 1024 * 1024  # proposal for a new cluster; the stored value wins
    min_replicas: int = 2  # a primary acknowledges writes while at least this many remain
    io_timeout: float = 60.0  # an access point gives up on an extent after this (NOT READY)
    # Re-replication, catch-up and drain (docs/datapath.md, "Rebuild and catch-up").
    replace_after: float = 60.0  # a member down this long is replaced on another server
    rebuild_rate: int = 64 * 1024 * 1024  # bytes/s this server copies to joining members
    rebuild_concurrency: int = 2  # extents this server joins members to at once
    repair_interval: float = 5.0  # seconds between repair passes
    # Planned restarts (docs/faults.md): how long the others wait for a server that stopped on
    # purpose (SIGTERM) or is starting, and a starting server for those already missing.
    restart_grace: float = 30.0
    # The primary follows the access point (docs/datapath.md, "Locality"): an access point
    # that keeps doing IO on an extent claims it; the primary makes it a member, hands over.
    locality: bool = True
    # Nexus epochs against stale in-flight writes after a path switch (docs/datapath.md,
    # "Fencing stale writes"). Off: logins store no epoch, writes carry none, none is checked.
    fence_writes: bool = True
    data_dir_check_interval: float = 5.0  # seconds between data directory probes
    # Background scrub (docs/scrub.md): a pass over every local replica, then a pause.
    scrub_rate: int = 8 * 1024 * 1024  # bytes/s of mapped data verified; 0 = unthrottled
    scrub_interval: float = 86400.0  # seconds between passes (the first after one); 0 = off
    # Also export every LUN through the kernel's LIO target (docs/lio.md): needs configfs,
    # target_core_user and rtslib-fb. LIO listens on lio_listen (not iscsi_listen's port).
    lio_export: bool = False
    lio_listen: str = "0.0.0.0:3260"
    # Worker processes (lunastor/chunk/workers.py, docs/scale.md): each owns the volumes
    # whose id hashes to its index (workers.owner); worker i serves the data port and
    # /metrics on data_listen's and admin_listen's port + i; worker 0 hands each iSCSI login
    # to the worker owning the initiator's volumes.
    workers: int = 1
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    log: LogSettings = field(default_factory=LogSettings)

    def validate(self) -> None:
        if not self.data_dirs:
            raise ConfigError("data_dirs: at least one data directory is required")
        for name in ("iscsi_listen", "data_listen", "admin_listen", "lio_listen"):
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
        if self.cluster_secret and len(self.cluster_secret) < 16:
            raise ConfigError("cluster_secret: at least 16 characters")
        if self.secret_key and len(self.secret_key) < 16:
            raise ConfigError("secret_key: at least 16 characters")
        if self.extent_size < (1 << 20) or self.extent_size & (self.extent_size - 1):
            raise ConfigError("extent_size: a power of two, at least 1 MiB")
        if self.extent_size > (64 << 20):
            raise ConfigError("extent_size: at most 64 MiB (the data protocol's payload cap)")
        if self.min_replicas < 1:
            raise ConfigError("min_replicas: at least 1")
        if self.io_timeout <= 0:
            raise ConfigError("io_timeout: must be positive")
        if self.replace_after < 0:
            raise ConfigError("replace_after: must not be negative")
        if self.rebuild_rate < 1 << 20:
            raise ConfigError("rebuild_rate: at least 1 MiB/s")
        if not 1 <= self.rebuild_concurrency <= 64:
            raise ConfigError("rebuild_concurrency: expected 1..64")
        if not 0 <= self.restart_grace <= 3600:
            raise ConfigError("restart_grace: expected 0..3600 seconds")
        if not 0.05 <= self.repair_interval <= 3600:
            raise ConfigError("repair_interval: expected 0.05..3600 seconds")
        if self.data_dir_check_interval <= 0:
            raise ConfigError("data_dir_check_interval: must be positive")
        if self.scrub_rate < 0:
            raise ConfigError("scrub_rate: bytes per second, 0 (unthrottled) or more")
        if self.scrub_interval < 0:
            raise ConfigError("scrub_interval: seconds, 0 (scrub off) or more")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers: expected 1..{MAX_WORKERS}, got {self.workers}")
        if self.workers > 1:
            last = self.workers - 1
            for name in ("data_listen", "admin_listen"):
                worker_address(getattr(self, name), last, name)
            if self.data_advertise:
                worker_address(self.data_advertise, last, "data_advertise")

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
