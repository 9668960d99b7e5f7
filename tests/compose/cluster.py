"""docker-compose.yml run for real: the project's compose file, its images built from nothing
(scripts/docker-base-image.sh where debian:bookworm-slim cannot be pulled), every container a
host on the compose network.

A `ComposeCluster` is one compose project with a name of its own, its own /24 network (one no
other Docker network uses) and meta's API on a free port of the host's 127.0.0.1, so that it
never meets a developer's own `docker compose up`. `down()` removes its containers, network and
volumes whatever happened.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "compose-test-admin-token"
CLIENT_IQN = "iqn.2026-12.org.example:compose-client"
DAEMONS = ("etcd", "meta", "chunk1", "chunk2", "chunk3", "redirector1", "redirector2")
CHUNKS = ("chunk1", "chunk2", "chunk3")
REDIRECTORS = ("redirector1", "redirector2")
T = TypeVar("T")


class ComposeError(RuntimeError):
    pass


def compose_command() -> list[str]:
    """`docker compose` where the plugin exists, else the older `docker-compose`."""
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, check=False
    )
    return ["docker", "compose"] if probe.returncode == 0 else ["docker-compose"]


def docker_available() -> str | None:
    """None when a Docker engine answers, else why not."""
    try:
        proc = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no Docker engine: {exc}"
    return None if proc.returncode == 0 else f"no Docker engine: {proc.stderr.strip()}"


def wait_for(check: Callable[[], T | None], timeout: float, what: str, step: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def free_network_prefix() -> str:
    """The first three octets of a /24 in 172.29.0.0/16 that no Docker network uses."""
    ids = subprocess.run(
        ["docker", "network", "ls", "-q"], capture_output=True, text=True, check=True
    ).stdout.split()
    used: list[ipaddress.IPv4Network] = []
    if ids:
        out = subprocess.run(
            [
                "docker",
                "network",
                "inspect",
                "-f",
                "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
                *ids,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for word in out.split():
            net = ipaddress.ip_network(word, strict=False)
            if isinstance(net, ipaddress.IPv4Network):
                used.append(net)
    for third in range(200, 256):
        candidate = ipaddress.IPv4Network(f"172.29.{third}.0/24")
        if not any(candidate.overlaps(u) for u in used):
            return f"172.29.{third}"
    raise ComposeError("no free /24 in 172.29.200.0-172.29.255.0 for the compose network")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ComposeCluster:
    def __init__(self, project: str, *, lease_ttl: float = 3, replace_after: float = 10) -> None:
        self.project = project
        self.compose = compose_command()
        self.net = free_network_prefix()
        self.api_port = free_port()
        self.env = dict(os.environ)
        self.env.update(
            COMPOSE_PROJECT_NAME=project,
            LUNASTOR_NET=self.net,
            LUNASTOR_API_PORT=str(self.api_port),
            LUNASTOR_ADMIN_TOKEN=TOKEN,
            LUNASTOR_LEASE_TTL=f"{lease_ttl:g}",
            LUNASTOR_REPLACE_AFTER=f"{replace_after:g}",
        )
        self.ids: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    # --- addresses --------------------------------------------------------------------------
    @property
    def vip(self) -> str:
        return f"{self.net}.100"

    def address(self, service: str) -> str:
        last = {"etcd": 2, "meta": 3, "chunk1": 11, "chunk2": 12, "chunk3": 13}
        last |= {"redirector1": 21, "redirector2": 22, "client": 50}
        return f"{self.net}.{last[service]}"

    def service_at(self, ip: str) -> str:
        return next(s for s in (*DAEMONS, "client") if self.address(s) == ip)

    # --- compose and docker -----------------------------------------------------------------
    def run(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`docker compose --profile client ARGS` for this project, from the repository root."""
        argv = [*self.compose, "-p", self.project, "--profile", "client", *args]
        proc = subprocess.run(
            argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise ComposeError(f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        return proc

    def container(self, service: str) -> str:
        if service not in self.ids:
            cid = self.run("ps", "-q", service).stdout.strip()
            if not cid:
                raise ComposeError(f"{service}: no container")
            self.ids[service] = cid
        return self.ids[service]

    def docker(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise ComposeError(
                f"docker {' '.join(args)}: exit {proc.returncode}: {proc.stdout} {proc.stderr}"
            )
        return proc

    def exec(
        self, service: str, *argv: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the service's container (as on that host)."""
        return self.docker("exec", self.container(service), *argv, timeout=timeout, check=check)

    def network(self) -> str:
        out = self.docker(
            "network",
            "ls",
            "-q",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            "label=com.docker.compose.network=lunastor",
        ).stdout.split()
        if len(out) != 1:
            raise ComposeError(f"expected one compose network, found {out}")
        return out[0]

    def volumes(self) -> list[str]:
        return self.docker(
            "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={self.project}"
        ).stdout.split()

    # --- life cycle -------------------------------------------------------------------------
    def build(self) -> None:
        """The base image (built from Debian's packages where it cannot be pulled), then every
        image of the compose file."""
        started = time.monotonic()
        base = subprocess.run(
            [str(ROOT / "scripts" / "docker-base-image.sh")],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if base.returncode != 0:
            raise ComposeError(f"scripts/docker-base-image.sh failed:\n{base.stderr[-3000:]}")
        self.timings["base image"] = time.monotonic() - started
        started = time.monotonic()
        # one service per image (the lunastor services share lunastor:dev), side by side;
        # `docker compose` builds in parallel by itself
        parallel = ["--parallel"] if self.compose == ["docker-compose"] else []
        self.run("build", *parallel, "etcd", "meta", "client", timeout=1500)
        self.timings["build"] = time.monotonic() - started

    def up(self, timeout: float = 240) -> None:
        started = time.monotonic()
        self.run("up", "-d", timeout=timeout)
        self.ids.clear()
        self.wait_healthy(DAEMONS, timeout)
        self.timings["up"] = time.monotonic() - started

    def health(self, service: str) -> str:
        out = self.docker(
            "inspect",
            "-f",
            "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
            self.container(service),
            check=False,
        ).stdout.split()
        if not out:
            return "absent"
        return out[1] if out[0] == "running" and len(out) > 1 else out[0]

    def wait_healthy(self, services: Sequence[str], timeout: float) -> None:
        def all_healthy() -> bool:
            return all(self.health(s) == "healthy" for s in services)

        try:
            wait_for(all_healthy, timeout, f"{', '.join(services)} healthy", step=1)
        except TimeoutError as exc:
            states = {s: self.health(s) for s in services}
            raise TimeoutError(f"{exc}: {states}") from None

    def logs(self, path: Path) -> None:
        proc = self.run("logs", "--no-color", "--timestamps", timeout=120, check=False)
        path.write_text(proc.stdout + proc.stderr)

    def down(self) -> None:
        """Containers, network and volumes gone, whatever state they are in."""
        self.run("down", "-v", "--remove-orphans", "--timeout", "5", timeout=300, check=False)
        self.ids.clear()

    # --- the REST API, from the host through meta's published port --------------------------
    def api(self, method: str, path: str, body: Any = None, ok: Sequence[int] = (200,)) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}", data=data, method=method
        )
        req.add_header("Authorization", f"Bearer {TOKEN}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode()
        if status not in ok:
            raise ComposeError(f"{method} {path}: {status} {text}")
        return json.loads(text) if text else None

    def chunks(self) -> dict[str, dict[str, Any]]:
        """Chunk servers by compose service, as meta sees them."""
        items = self.api("GET", "/v1/chunks")["items"]
        return {self.service_at(i["portal"].rsplit(":", 1)[0]): i for i in items}

    def chunk_service(self, chunk_id: str) -> str:
        return next(s for s, i in self.chunks().items() if i["id"] == chunk_id)

    def vip_holders(self) -> list[str]:
        """The redirectors whose eth0 has the VIP now (a stopped one holds nothing)."""
        holders = []
        for r in REDIRECTORS:
            if self.health(r) in ("exited", "absent"):
                continue
            out = self.exec(r, "ip", "-o", "addr", "show", "dev", "eth0", check=False).stdout
            if f" {self.vip}/" in out:
                holders.append(r)
        return holders
