"""A real multi-member etcd cluster for failover tests (tests/support starts single members)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
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

    tls: Path | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"etcd member {self.name} exited")
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls / "ca.crt"))
            context.load_cert_chain(self.tls / "client.crt", self.tls / "client.key")
        url = f"{self.scheme}://{self.endpoint}/health"
        with urllib.request.urlopen(url, timeout=1, context=context) as resp:
            return b'"true"' in resp.read()


@dataclass
class EtcdCluster:
    size: int = 3
    #: A directory from `make_tls_files`: serve clients over TLS with client certificates.
    tls: Path | None = None
    #: More etcd flags for every member.
    extra_args: list[str] = field(default_factory=list)
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lunastor-etcdc-")))
    members: list[Member] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        self.members = [Member(f"m{i}", tls=self.tls) for i in range(self.size)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            log = open(self.data_dir / f"{m.name}.log", "ab")  # noqa: SIM115 - child keeps it
            client_url = f"{m.scheme}://{m.endpoint}"
            tls_args = []
            if self.tls is not None:
                tls_args = [
                    "--cert-file", str(self.tls / "server.crt"),
                    "--key-file", str(self.tls / "server.key"),
                    "--trusted-ca-file", str(self.tls / "ca.crt"),
                    "--client-cert-auth",
                ]  # fmt: skip
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
                    *tls_args,
                    *self.extra_args,
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

    def leader(self) -> str:
        """Endpoint of the current raft leader (plain-HTTP clusters only)."""
        for m in self.members:
            if m.proc is None or m.proc.poll() is not None:
                continue
            req = urllib.request.Request(f"http://{m.endpoint}/v3/maintenance/status", b"{}")
            with urllib.request.urlopen(req, timeout=2) as resp:
                status = json.loads(resp.read())
            if status["header"]["member_id"] == status["leader"]:
                return m.endpoint
        raise RuntimeError("no etcd member says it is the leader")

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


def make_tls_files(d: Path) -> Path:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate, made
    with the openssl CLI (the `cryptography` package is not installed); plus an unrelated CA."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                "-days", "2", "-subj", f"/CN=lunastor test {ca}")  # fmt: skip
    exts = {
        "server": "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for name, ext in exts.items():
        (d / f"{name}.ext").write_text(ext)
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=lunastor-{name}")  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                "-extfile", f"{name}.ext")  # fmt: skip
    return d
