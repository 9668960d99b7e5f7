"""Turn the daemons' configuration sections into the clients' settings objects."""

from __future__ import annotations

from lunastor.common.config import EtcdSettings
from lunastor.common.etcd import EtcdConfig


def etcd_client_config(settings: EtcdSettings) -> EtcdConfig:
    return EtcdConfig(
        endpoints=list(settings.endpoints),
        namespace=settings.namespace,
        timeout=settings.timeout,
        ca_cert=settings.ca_cert or None,
        cert=settings.cert or None,
        key=settings.key or None,
        user=settings.user or None,
        password=settings.password or None,
    )
