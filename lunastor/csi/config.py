"""`lunastor-csi` configuration (TOML file, LUNASTOR_* environment, --set flags), as for the
daemons (lunastor.common.config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lunastor.common.config import ConfigError, LogSettings

DRIVER_NAME = "csi.lunastor.io"


@dataclass
class IscsiSettings:
    """open-iscsi session timers set on every node record before login (docs/csi.md says
    why each value). A dead connection is noticed within interval + timeout seconds; IO is
    queued, not failed, for `replacement_timeout` seconds while iscsid logs in again through
    the VIP."""

    replacement_timeout: int = 60
    noop_out_interval: int = 2
    noop_out_timeout: int = 3
    # seconds iscsid waits before it reconnects after a lost connection (open-iscsi: 2; the
    # target offers 0 and the larger value wins): 0 lets a failover's login go out at once
    default_time2wait: int = 0
    login_timeout: int = 15
    iscsiadm: str = "iscsiadm"
    initiator_name_file: str = "/etc/iscsi/initiatorname.iscsi"
    device_timeout: float = 60.0  # seconds to wait for the LUN's disk after login


@dataclass
class CsiConfig:
    driver_name: str = DRIVER_NAME
    # controller: the meta REST API and a token of role `csi` (LUNASTOR_API_TOKEN)
    api_url: str = "http://127.0.0.1:8080"
    api_token: str = ""
    api_token_file: str = ""
    # node: its zone (topology.lunastor.io/zone) and the most volumes it takes (0: no limit)
    zone: str = "default"
    max_volumes: int = 0
    node_id: str = ""  # the initiator name; read from iscsi.initiator_name_file when empty
    metrics_listen: str = ""  # HOST:PORT for /metrics and /healthz; empty: none
    iscsi: IscsiSettings = field(default_factory=IscsiSettings)
    log: LogSettings = field(default_factory=LogSettings)

    def validate(self) -> None:
        if not self.driver_name or len(self.driver_name) > 63:
            raise ConfigError("driver_name: 1 to 63 characters")
        if self.max_volumes < 0:
            raise ConfigError("max_volumes: must not be negative")
        if not 1 <= self.iscsi.replacement_timeout <= 3600:
            raise ConfigError("iscsi.replacement_timeout: 1..3600 seconds")
        if (
            not 1 <= self.iscsi.noop_out_interval <= 60
            or not 1 <= self.iscsi.noop_out_timeout <= 60
        ):
            raise ConfigError("iscsi.noop_out_interval/noop_out_timeout: 1..60 seconds")
        if not 0 <= self.iscsi.default_time2wait <= 3600:
            raise ConfigError("iscsi.default_time2wait: 0..3600 seconds")

    def token(self) -> str:
        if self.api_token:
            return self.api_token
        if self.api_token_file:
            try:
                with open(self.api_token_file) as f:
                    return f.read().strip()
            except OSError as exc:
                raise ConfigError(f"api_token_file {self.api_token_file}: {exc}") from None
        raise ConfigError("api_token or api_token_file: the controller needs a csi-role token")
