"""Host side: the dev cluster inside the guest's network namespace (`devnet.py`).

    with GuestNet() as net, NetCluster(net, workdir / "cluster") as cluster:
        vol = cluster.create_volume("disk", 256 * MIB, replicas=3, initiators=[GUEST_IQN])
        cluster.portal                       # the VIP's portal: 10.78.0.100:3260
        cluster.session_holder()             # the chunk server a session is open on
        cluster.kill("chunk2")               # `lunastor dev stop chunk2 --kill`

Every address of `prefix` (10.78.0.0/16) is local inside the namespace (`ip route add local`),
so etcd, meta, the redirector's VIP and the chunk servers' portals are reachable from the
guest through tap0, and from nowhere else. The test process itself stays outside the
namespace: it reaches the REST API and the daemons' /metrics with curl run inside it
(`ip netns exec`), and the supervisor over its control socket (a file).

Each chunk server's data directory is its own tmpfs, so the free space it reports through the
REST API (statvfs of its data directory, refreshed every `status_interval`) is exactly what
lunastor stores there: the fstrim scenario measures what UNMAP gave back with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.kernel.harness import GuestNet
from tests.kernel.target import REPO

T = TypeVar("T")
LUNASTOR = [sys.executable, "-m", "lunastor.cli.main"]


class ClusterError(Exception):
    """The dev cluster did not come up or refused a request; the message says which."""


def wait_until(condition: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `condition` until truthy; ClusterError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def _sh(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def unmount_below(directory: Path) -> None:
    """Unmount every file system mounted at or below `directory` (a crashed run's tmpfs)."""
    with contextlib.suppress(OSError):
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        points = [line.split()[1] for line in mounts]
        root = str(directory.resolve())
        for point in sorted(points, key=len, reverse=True):
            if point == root or point.startswith(root + "/"):
                _sh("umount", "-l", point)


@dataclass
class NetCluster:
    """etcd, meta, `chunks` chunk servers and a redirector, all inside `net`'s namespace."""

    net: GuestNet
    directory: Path
    chunks: int = 3
    prefix: str = "10.78"
    lease_ttl: float = 2.0
    status_interval: float = 1.0
    tmpfs_mib: int = 1024  # per chunk server; only what is stored takes memory
    proc: subprocess.Popen[bytes] | None = None
    state: dict[str, Any] = field(default_factory=dict)

    # -- addresses -------------------------------------------------------------------------------

    @property
    def route(self) -> str:
        """What the guest routes through the tap to reach the cluster."""
        return f"{self.prefix}.0.0/16"

    @property
    def portal(self) -> str:
        return str(self.state["portal"])

    @property
    def etcd_endpoint(self) -> str:
        return str(self.state["etcd"]["endpoints"][0])

    @property
    def log(self) -> Path:
        return self.directory / "supervisor.log"

    def chunk_names(self) -> list[str]:
        return [f"chunk{i}" for i in range(1, self.chunks + 1)]

    def secret(self, name: str) -> str:
        """A cluster secret the supervisor keeps in its directory (secret-key, cluster-secret)."""
        return (self.directory / name).read_text().strip()

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> NetCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 120) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._ip("route", "add", "local", self.route, "dev", "lo")
        for name in self.chunk_names():
            data = self.directory / "data" / name
            data.mkdir(parents=True, exist_ok=True)
            mount = _sh("mount", "-t", "tmpfs", "-o", f"size={self.tmpfs_mib}m", "tmpfs", str(data))
            if mount.returncode != 0:
                raise ClusterError(f"tmpfs for {name}: {mount.stderr.strip()}")
        env = dict(
            os.environ,
            PYTHONPATH=str(REPO),
            # capacity refreshed every second (default 10 s): fstrim's effect shows quickly
            LUNASTOR_STATUS_INTERVAL=str(self.status_interval),
        )
        argv = [sys.executable, "-m", "tests.kernel.devnet", str(self.directory), self.prefix]
        argv += [str(self.chunks), str(self.lease_ttl)]
        self.proc = self.net.popen(argv, log=self.log, env=env)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise ClusterError(f"dev cluster exited {self.proc.returncode}: {self.tail()}")
            return "ready " in self.log.read_text(errors="replace")

        wait_until(ready, timeout, f"the dev cluster to start ({self.log})")
        self.state = json.loads((self.directory / "cluster.json").read_text())

        def all_up() -> bool:
            items = self.api("GET", "/v1/chunks")["items"]
            return sum(i["state"] == "up" for i in items) == self.chunks

        wait_until(all_up, 60, "every chunk server to be up")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the supervisor stops every daemon
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # its children get SIGKILL too (PR_SET_PDEATHSIG)
                self.proc.wait(10)
        unmount_below(self.directory / "data")

    def tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""

    def _ip(self, *args: str) -> None:
        proc = _sh("ip", "-n", self.net.name, *args)
        if proc.returncode != 0:
            raise ClusterError(f"ip {' '.join(args)}: {proc.stderr.strip()}")

    # -- talking to it ---------------------------------------------------------------------------

    def curl(self, *args: str) -> str:
        """curl inside the namespace; returns its stdout ("" when it cannot connect)."""
        return _sh(*self.net.cmd(["curl", "-s", "-m", "10", *args])).stdout

    def api(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200,)) -> Any:
        args = ["-X", method, "-w", "\n%{http_code}"]
        args += ["-H", f"Authorization: Bearer {self.state['admin_token']}"]
        if body is not None:
            args += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
        out = self.curl(*args, f"{self.state['api_url']}{path}")
        text, _, code = out.rpartition("\n")
        status = int(code) if code.strip().isdigit() else 0
        if status not in ok:
            raise ClusterError(f"{method} {path}: HTTP {status} {text.strip()[:500]}")
        return json.loads(text) if text.strip() else None

    def create_volume(
        self, name: str, size: int, replicas: int, initiators: list[str]
    ) -> dict[str, Any]:
        body = {"name": name, "size_bytes": size, "replicas": replicas}
        vol: dict[str, Any] = self.api("POST", "/v1/volumes", body, ok=(201,))
        for initiator in initiators:
            self.publish(vol["id"], initiator)
        return vol

    def publish(self, volume_id: str, initiator: str) -> None:
        body = {"initiator": initiator}
        self.api("POST", f"/v1/volumes/{volume_id}/exports", body, ok=(200, 201))

    def unpublish(self, volume_id: str, initiator: str) -> None:
        self.api("DELETE", f"/v1/volumes/{volume_id}/exports/{initiator}", ok=(204,))

    def metric(self, daemon: str, name: str) -> float:
        """`name{type="normal"}` from a chunk server's /metrics (0 when it does not answer)."""
        admin = self.state["daemons"][daemon]["endpoints"]["admin"]
        text = self.curl(f"http://{admin}/metrics")
        match = re.search(rf'^{re.escape(name)}\{{type="normal"\}} ([0-9.e+]+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    def session_holders(self) -> list[str]:
        """The chunk servers with a normal iSCSI session open now."""
        return [n for n in self.chunk_names() if self.metric(n, "lunastor_iscsi_sessions") >= 1]

    def redirect_targets(self) -> list[str]:
        """The chunk servers the redirector sends logins to now (its /healthz)."""
        admin = self.state["daemons"]["redirector"]["endpoints"]["admin"]
        text = self.curl(f"http://{admin}/healthz")
        try:
            return list(json.loads(text).get("chunk_servers_up", []))
        except ValueError:
            return []

    def up_in_zone(self, zone: str) -> list[str]:
        """Ids of the chunk servers of `zone` that are up."""
        items = self.api("GET", "/v1/chunks")["items"]
        return [i["id"] for i in items if i["zone"] == zone and i["state"] == "up"]

    def used_bytes(self) -> int:
        """What the live chunk servers store: capacity - free of their data directories."""
        items = self.api("GET", "/v1/chunks")["items"]
        return sum(int(i["capacity"]) - int(i["free"]) for i in items if i["state"] == "up")

    def control(self, *args: str) -> str:
        """`lunastor dev ARGS --dir DIR` (stop/start a daemon through the supervisor)."""
        proc = subprocess.run(
            [*LUNASTOR, "dev", *args, "--dir", str(self.directory)],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        if proc.returncode != 0:
            raise ClusterError(f"lunastor dev {' '.join(args)}: {proc.stdout}{proc.stderr}")
        return proc.stdout.strip()

    def kill(self, daemon: str) -> None:
        self.control("stop", daemon, "--kill")

    def name_of(self, chunk_id: str) -> str:
        """The daemon name of a chunk server id (its data directory holds the id)."""
        for name in self.chunk_names():
            path = self.directory / "data" / name / "chunk-id"
            if path.exists() and path.read_text().strip() == chunk_id:
                return name
        raise ClusterError(f"no chunk server of this cluster has id {chunk_id}")

    def _pid(self, daemon: str) -> int:
        state = json.loads((self.directory / "cluster.json").read_text())
        pid = state["daemons"][daemon]["pid"]
        if not pid:
            raise ClusterError(f"{daemon} is not running")
        return int(pid)

    def freeze(self, daemon: str) -> None:
        """SIGSTOP: the process lives on, holds its connections and answers nothing (a frozen
        or cut-off server; its crash guard sees nothing)."""
        os.kill(self._pid(daemon), signal.SIGSTOP)

    def thaw(self, daemon: str) -> None:
        with contextlib.suppress(ProcessLookupError, ClusterError):
            os.kill(self._pid(daemon), signal.SIGCONT)

    def stop_daemon(self, daemon: str) -> None:
        self.control("stop", daemon)
