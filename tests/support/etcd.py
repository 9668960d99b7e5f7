"""A real etcd server for tests: free ports, a temporary data dir, stopped at the end."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.procs import free_port, wait_for

ETCD_BINARY = shutil.which("etcd") or "/usr/bin/etcd"


@dataclass
class EtcdServer:
    """One etcd member. `host` is the address it binds (tests in namespaces pass their own)."""

    host: str = "127.0.0.1"
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lunastor-etcd-")))
    client_port: int = 0
    peer_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.client_port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def start(self, timeout: float = 20.0) -> EtcdServer:
        self.client_port = self.client_port or free_port(self.host)
        self.peer_port = self.peer_port or free_port(self.host)
        host = f"[{self.host}]" if ":" in self.host else self.host
        client_url = f"http://{host}:{self.client_port}"
        peer_url = f"http://{host}:{self.peer_port}"
        log = open(self.data_dir / "etcd.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [
                ETCD_BINARY,
                "--name",
                "test",
                "--data-dir",
                str(self.data_dir / "data"),
                "--listen-client-urls",
                client_url,
                "--advertise-client-urls",
                client_url,
                "--listen-peer-urls",
                peer_url,
                "--initial-advertise-peer-urls",
                peer_url,
                "--initial-cluster",
                f"test={peer_url}",
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ],
            stdout=log,
            stderr=log,
            env={
                **os.environ,
                "ETCD_UNSUPPORTED_ARCH": os.environ.get("ETCD_UNSUPPORTED_ARCH", ""),
            },
        )
        log.close()
        wait_for(self.healthy, timeout, f"etcd on {self.endpoint} to be healthy")
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"etcd exited; see {self.data_dir / 'etcd.log'}")
        with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
            return b'"true"' in resp.read()

    def kv_requests(self) -> int:
        """Every KV request etcd has answered (Range, Txn, Put, DeleteRange), from its metrics:
        what tests count round trips by."""
        with urllib.request.urlopen(f"http://{self.endpoint}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines()
            if line.startswith("grpc_server_handled_total{")
            and 'grpc_service="etcdserverpb.KV"' in line
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
