"""A real multi-member etcd cluster for failover tests (tests/support starts single members)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.etcd import ETCD_BINARY
from tests.support.procs import free_port, wait_for


@dataclass
class Member:
    name: str
    host: str = "127.0.0.1"
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"etcd member {self.name} exited")
        with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as resp:
            return b'"true"' in resp.read()


@dataclass
class EtcdCluster:
    size: int = 3
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lunastor-etcdc-")))
    members: list[Member] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        self.members = [Member(f"m{i}") for i in range(self.size)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            log = open(self.data_dir / f"{m.name}.log", "ab")  # noqa: SIM115 - child keeps it
            client_url = f"http://{m.endpoint}"
            m.proc = subprocess.Popen(
                [
                    ETCD_BINARY,
                    "--name", m.name,
                    "--data-dir", str(self.data_dir / m.name),
                    "--listen-client-urls", client_url,
                    "--advertise-client-urls", client_url,
                    "--listen-peer-urls", m.peer_url,
                    "--initial-advertise-peer-urls", m.peer_url,
                    "--initial-cluster", initial,
                    "--initial-cluster-state", "new",
                    "--initial-cluster-token", self.data_dir.name,
                    "--logger", "zap",
                    "--log-outputs", "stderr",
                ],
                stdout=log,
                stderr=log,
                env=dict(os.environ),
            )  # fmt: skip
            log.close()
        for m in self.members:
            wait_for(m.healthy, timeout, f"etcd member {m.name} to be healthy")
        return self

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def member(self, endpoint: str) -> Member:
        return next(m for m in self.members if m.endpoint == endpoint)

    def kill(self, endpoint: str) -> None:
        proc = self.member(endpoint).proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def cleanup(self) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.kill()
                m.proc.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)
