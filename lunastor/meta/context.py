"""The services a handler reaches through its application (aiohttp AppKeys)."""

from __future__ import annotations

from aiohttp import web

from lunastor.common.etcd import Etcd
from lunastor.meta.cluster_store import ClusterStore
from lunastor.meta.config import MetaConfig
from lunastor.meta.store import Store

ETCD_KEY = web.AppKey("etcd", Etcd)
CONFIG_KEY = web.AppKey("config", MetaConfig)
STORE_KEY = web.AppKey("store", Store)
CLUSTER_STORE_KEY = web.AppKey("cluster_store", ClusterStore)
ROLE_KEY = web.RequestKey("role", str)  # the caller's role, set by the auth middleware
