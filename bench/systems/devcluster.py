"""A lunastor dev cluster (`lunastor dev up --detach`: etcd, meta, chunk servers, redirector)
and its volumes, for benchmarks.

CPU accounting: the chunk servers are the system's server processes (they carry every IO);
etcd, meta and the redirector are a separate "control" group, reported apart.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cpu import ProcessGroup
from bench.qemu_img import iscsi_opts
from bench.systems import BENCH_INITIATOR
from lunastor.cli.api import ApiClient
from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.extent_pages import extent_records
from lunastor.common.records import ExtentRecord, Keys

LUNASTOR = [sys.executable, "-m", "lunastor.cli.main"]
CONTROL_DAEMONS = ("etcd", "meta", "redirector")


def lunastor(*args: str, timeout: float = 180) -> str:
    proc = subprocess.run([*LUNASTOR, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"lunastor {' '.join(args)}: {proc.stderr.strip() or proc.stdout}")
    return proc.stdout


@dataclass(frozen=True)
class Volume:
    id: str
    name: str
    size: int
    replicas: int
    target: str
    lun: int
    initiator: str = BENCH_INITIATOR  # the one it is exported to

    def image_opts(self, portal: str) -> str:
        return iscsi_opts(portal, self.target, self.lun, self.initiator)

    def url(self, portal: str) -> str:
        """iscsi:// URL, for bench/iscsi_load.c."""
        return f"iscsi://{portal}/{self.target}/{self.lun}"


class DevCluster:
    """A running dev cluster in `directory` (see `dev_cluster`)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.state: dict[str, Any] = json.loads((directory / "cluster.json").read_text())
        self.api = ApiClient(self.state["api_url"], self.state["admin_token"], timeout=60)

    def refresh(self) -> None:
        self.state = json.loads((self.dir / "cluster.json").read_text())

    def daemon(self, name: str) -> dict[str, Any]:
        info: dict[str, Any] = self.state["daemons"][name]
        return info

    def chunk_names(self) -> list[str]:
        return sorted(n for n, d in self.state["daemons"].items() if d["kind"] == "chunk")

    def portal(self, chunk: str) -> str:
        portal: str = self.daemon(chunk)["endpoints"]["portal"]
        return portal

    @property
    def vip_portal(self) -> str:
        portal: str = self.state["portal"]
        return portal

    def _pids(self, names: Sequence[str]) -> list[int]:
        self.refresh()
        daemons = self.state["daemons"]
        return [int(daemons[n]["pid"]) for n in names if n in daemons and daemons[n].get("pid")]

    def chunk_pids(self) -> list[int]:
        """Every chunk server process: each server's first, and its other workers."""
        firsts = self._pids(self.chunk_names())
        return [*firsts, *(w for pid in firsts for w in worker_pids(pid))]

    def control_pids(self) -> list[int]:
        return self._pids(CONTROL_DAEMONS)

    def servers(self) -> ProcessGroup:
        return ProcessGroup(f"the {len(self.chunk_names())} chunk servers", self.chunk_pids)

    def control(self) -> ProcessGroup:
        return ProcessGroup("etcd, meta, redirector", self.control_pids)

    def create_volume(
        self, name: str, size: int, replicas: int, initiator: str = BENCH_INITIATOR
    ) -> Volume:
        """A volume exported to `initiator` (the bench's)."""
        body = {"name": name, "size_bytes": size, "replicas": replicas}
        vol = self.api.request("POST", "/v1/volumes", body)
        export = self.api.request(
            "POST", f"/v1/volumes/{vol['id']}/exports", {"initiator": initiator}
        )
        return Volume(
            id=vol["id"],
            name=name,
            size=size,
            replicas=replicas,
            target=export["target_iqn"],
            lun=int(export["lun"]),
            initiator=initiator,
        )

    def metrics(self, chunk: str) -> str:
        """The Prometheus text of one chunk server's /metrics (its worker 0's)."""
        return self.metrics_at(self.daemon(chunk)["endpoints"]["admin"])

    def metrics_at(self, admin: str) -> str:
        """The Prometheus text of the /metrics at `admin` (HOST:PORT)."""
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as resp:
            text: str = resp.read().decode()
        return text

    def metric(self, chunk: str, name: str) -> float:
        """Sum of every sample of metric `name` on one chunk server (0 when absent)."""
        return sum(metric_samples(self.metrics(chunk), name).values())

    def extents(self, volume_id: str | None = None) -> list[ExtentRecord]:
        """The extent records of one volume, or of every volume."""
        prefix = Keys.EXTENTS if volume_id is None else Keys.volume_extents(volume_id)

        async def read() -> list[ExtentRecord]:
            etcd = self.state["etcd"]
            cfg = EtcdConfig(endpoints=etcd["endpoints"], namespace=etcd["namespace"])
            async with await Etcd.connect(cfg) as client:
                kvs, _ = await client.get_prefix(prefix)
            return extent_records(kvs)

        return asyncio.run(read())

    def chunk_id(self, chunk: str) -> str:
        return (self.dir / "data" / chunk / "chunk-id").read_text().strip()

    def stop(self, name: str, kill: bool = False) -> None:
        lunastor("dev", "stop", name, *(["--kill"] if kill else []), "--dir", str(self.dir))
        self.refresh()

    def start(self, name: str) -> None:
        lunastor("dev", "start", name, "--dir", str(self.dir))
        self.refresh()


def worker_pids(pid: int) -> list[int]:
    """The other worker processes of the chunk server whose first process is `pid`
    (lunastor/chunk/workers.py): its children that run the chunk server too."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = []
    for child in children:
        try:
            if b"lunastor.chunk.main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(int(child))
        except OSError:
            continue
    return out


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})? (\S+)", re.M)


def metric_samples(text: str, name: str) -> dict[str, float]:
    """The samples of metric `name` in Prometheus text, by label set ('' for none)."""
    return {
        labels or "": float(value)
        for metric, labels, value in _SAMPLE.findall(text)
        if metric == name
    }


@contextmanager
def dev_cluster(
    directory: Path,
    chunks: int = 3,
    env: Mapping[str, str] | None = None,
    chunk_workers: int = 1,
) -> Iterator[DevCluster]:
    """`lunastor dev up --detach` in `directory` on a random 127.x prefix, `dev down` on exit.
    `env` (e.g. LUNASTOR_REBUILD_RATE) reaches the daemons through the environment;
    `chunk_workers`: worker processes per chunk server."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        up = ["dev", "up", "--detach", "--dir", str(directory), "--chunks", str(chunks),
              "--chunk-workers", str(chunk_workers)]  # fmt: skip
        try:
            lunastor(*up, "--address-prefix", f"127.{random.randint(100, 250)}")
            yield DevCluster(directory)
        finally:
            subprocess.run(
                [*LUNASTOR, "dev", "down", "--dir", str(directory)],
                capture_output=True,
                timeout=120,
            )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
