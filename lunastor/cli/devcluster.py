"""A whole lunastor cluster on one machine: etcd, meta, N chunk servers and a redirector.

`lunastor dev up` runs a supervisor (this module) that starts every daemon as a child process,
each on its own loopback address as if it were its own host, and writes one state file,
`<dir>/cluster.json`, with every endpoint, PID, the etcd endpoint and the admin token. The
supervisor answers `dev stop|start|down` over a unix socket in the same directory and stops
every child when it gets SIGTERM/SIGINT. Children die with it even if it is SIGKILLed
(PR_SET_PDEATHSIG), so a dev cluster never leaves orphans.

The CLI does not import the daemons (ARCHITECTURE.md): it starts them as processes and writes
their TOML configuration; tests check that each daemon accepts what is written here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lunastor.common.config import to_toml_table

STATE_FILE = "cluster.json"
CONTROL_SOCKET = "control.sock"
STATE_VERSION = 1
DEFAULT_PREFIX = "127.10"
NAMESPACE = "/lunastor"
PR_SET_PDEATHSIG = 1


class DevClusterError(Exception):
    """Something the user can fix (a busy address, no etcd binary, no cluster in that dir)."""


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the supervisor goes away, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setpgid(0, 0)  # own process group: a Ctrl-C at the terminal reaches only the supervisor


@dataclass
class Layout:
    """Which loopback address and port each daemon gets: `prefix` is the first two octets."""

    prefix: str = DEFAULT_PREFIX
    chunks: int = 3
    etcd_members: int = 1  # 3 or 5 for a cluster that survives losing members
    # worker processes per chunk server; worker i takes ports 3270 + i and 9100 + i
    chunk_workers: int = 1

    def etcd_host(self, member: int) -> str:
        """Member 1 (daemon `etcd`) on .0.1, members 2.. (`etcd-2`, ...) on .0.11, .0.12..."""
        return f"{self.prefix}.0.1" if member == 1 else f"{self.prefix}.0.{9 + member}"

    @property
    def etcd_clients(self) -> list[str]:
        return [f"{self.etcd_host(m)}:2379" for m in range(1, self.etcd_members + 1)]

    @property
    def meta_listen(self) -> str:
        return f"{self.prefix}.0.1:8080"

    @property
    def vip(self) -> str:
        return f"{self.prefix}.0.100"

    @property
    def redirector_admin(self) -> str:
        return f"{self.prefix}.0.2:9101"

    def chunk_host(self, index: int) -> str:
        return f"{self.prefix}.1.{index}"


@dataclass
class Daemon:
    name: str
    kind: str  # etcd | meta | chunk | redirector
    argv: list[str]
    log: Path
    health_url: str = ""
    endpoints: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    exit_status: int | None = None
    stopped_by_user: bool = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            log.write(f"--- start {time.strftime('%Y-%m-%dT%H:%M:%S')} {self.argv}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
                close_fds=True,
            )
        self.exit_status = None
        self.stopped_by_user = False

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def wait(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self, kill: bool = False, timeout: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL after `timeout`), or SIGKILL at once with `kill`."""
        self.stopped_by_user = True
        if kill:
            self.signal(signal.SIGKILL)
        else:
            self.signal(signal.SIGTERM)
            if not self.wait(timeout):
                self.signal(signal.SIGKILL)
        self.wait(timeout)
        if self.proc is not None:
            self.exit_status = self.proc.returncode

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise DevClusterError(f"{self.name} exited during start-up; see {self.log}")
        if not self.health_url:
            return True
        try:
            with urllib.request.urlopen(self.health_url, timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise DevClusterError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


class Supervisor:
    """Starts, watches and stops the daemons of one dev cluster directory."""

    def __init__(self, directory: Path, layout: Layout, lease_ttl: float = 5.0) -> None:
        self.dir = directory.resolve()
        self.layout = layout
        self.lease_ttl = lease_ttl
        self.token = ""
        self.csi_token = secrets.token_urlsafe(24)  # role `csi`, for lunastor-csi controllers
        self.daemons: dict[str, Daemon] = {}

    # -- configuration -------------------------------------------------------------------------

    def _etcd_settings(self) -> dict[str, Any]:
        return {"endpoints": self.layout.etcd_clients, "namespace": NAMESPACE}

    def _write_config(self, name: str, table: dict[str, Any]) -> Path:
        path = self.dir / "config" / f"{name}.toml"
        path.write_text(to_toml_table(table))
        return path

    def _secret_key(self, name: str = "secret-key") -> str:
        """meta's sealing key for CHAP secrets (or another cluster secret, by file name): made
        once, kept with the cluster's data."""
        path = self.dir / name
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32))
        return path.read_text().strip()

    def _python_daemon(
        self,
        name: str,
        kind: str,
        module: str,
        table: dict[str, Any],
        health: str,
        endpoints: dict[str, str],
    ) -> Daemon:
        config = self._write_config(name, table)
        return Daemon(
            name=name,
            kind=kind,
            argv=[sys.executable, "-m", module, "--config", str(config)],
            log=self.dir / "logs" / f"{name}.log",
            health_url=f"http://{health}/healthz",
            endpoints=endpoints,
        )

    def plan(self) -> None:
        """Decide every daemon's command line and configuration (nothing starts yet)."""
        layout = self.layout
        (self.dir / "config").mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        etcd_bin = shutil.which("etcd")
        if etcd_bin is None:
            raise DevClusterError("etcd is not installed (run ./scripts/setup.sh)")
        members = {
            ("etcd" if m == 1 else f"etcd-{m}"): layout.etcd_host(m)
            for m in range(1, layout.etcd_members + 1)
        }
        initial = ",".join(f"{name}=http://{host}:2380" for name, host in members.items())
        for name, host in members.items():
            client_url, peer_url = f"http://{host}:2379", f"http://{host}:2380"
            self.daemons[name] = Daemon(
                name=name,
                kind="etcd",
                argv=[
                    etcd_bin,
                    "--name",
                    name,
                    "--data-dir",
                    str(self.dir / name),
                    "--listen-client-urls",
                    client_url,
                    "--advertise-client-urls",
                    client_url,
                    "--listen-peer-urls",
                    peer_url,
                    "--initial-advertise-peer-urls",
                    peer_url,
                    "--initial-cluster",
                    initial,
                    "--logger",
                    "zap",
                    "--log-outputs",
                    "stderr",
                ],
                log=self.dir / "logs" / f"{name}.log",
                health_url=f"{client_url}/health",
                endpoints={"client": f"{host}:2379"},
            )
        log = {"level": "info", "format": "kv"}
        self.daemons["meta"] = self._python_daemon(
            "meta",
            "meta",
            "lunastor.meta.main",
            {
                "listen": layout.meta_listen,
                "portal": f"{layout.vip}:3260",
                "lease_ttl": self.lease_ttl,
                "auth": {"admin_tokens": [self.token], "csi_tokens": [self.csi_token]},
                "secret_key": self._secret_key(),
                "etcd": self._etcd_settings(),
                "log": log,
            },
            layout.meta_listen,
            {"api": f"http://{layout.meta_listen}"},
        )
        for i in range(1, layout.chunks + 1):
            host = layout.chunk_host(i)
            name = f"chunk{i}"
            data_dir = self.dir / "data" / name
            data_dir.mkdir(parents=True, exist_ok=True)
            self.daemons[name] = self._python_daemon(
                name,
                "chunk",
                "lunastor.chunk.main",
                {
                    "data_dirs": [str(data_dir)],
                    "zone": f"zone{(i - 1) % 3 + 1}",
                    "iscsi_listen": f"{host}:3260",
                    "data_listen": f"{host}:3270",
                    "admin_listen": f"{host}:9100",
                    "lease_ttl": self.lease_ttl,
                    **({"workers": layout.chunk_workers} if layout.chunk_workers > 1 else {}),
                    # the same data-port secret and CHAP sealing key in every chunk server
                    "cluster_secret": self._secret_key("cluster-secret"),
                    "secret_key": self._secret_key(),
                    "etcd": self._etcd_settings(),
                    "log": log,
                },
                f"{host}:9100",
                {"portal": f"{host}:3260", "data": f"{host}:3270", "admin": f"{host}:9100"},
            )
        self.daemons["redirector"] = self._python_daemon(
            "redirector",
            "redirector",
            "lunastor.redirector.main",
            {
                "id": "redirector1",
                "vip": layout.vip,
                "portal_port": 3260,
                "admin_listen": layout.redirector_admin,
                "lease_ttl": self.lease_ttl,
                "secret_key": self._secret_key(),  # opens discovery CHAP secrets
                "etcd": self._etcd_settings(),
                "log": log,
            },
            layout.redirector_admin,
            {"portal": f"{layout.vip}:3260", "admin": layout.redirector_admin},
        )

    # -- state file ----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "dir": str(self.dir),
            "supervisor_pid": os.getpid(),
            "control_socket": str(self.dir / CONTROL_SOCKET),
            "etcd": self._etcd_settings(),
            "api_url": f"http://{self.layout.meta_listen}",
            "admin_token": self.token,
            "csi_token": self.csi_token,
            "portal": f"{self.layout.vip}:3260",
            "daemons": {
                d.name: {
                    "kind": d.kind,
                    "pid": d.pid,
                    "running": d.pid is not None,
                    "exit_status": d.exit_status,
                    "endpoints": d.endpoints,
                    "log": str(d.log),
                    "argv": d.argv,
                }
                for d in self.daemons.values()
            },
        }

    def write_state(self) -> None:
        path = self.dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2) + "\n")
        os.chmod(tmp, 0o600)  # it holds the admin token
        os.replace(tmp, path)

    # -- lifecycle -----------------------------------------------------------------------------

    def start_all(self, timeout: float = 60.0) -> None:
        etcds = [n for n, d in self.daemons.items() if d.kind == "etcd"]
        chunks = [n for n in self.daemons if n.startswith("chunk")]

        def start(names: list[str]) -> None:
            for name in names:
                self.daemons[name].start()
                self.write_state()

        def wait(names: list[str]) -> None:
            for name in names:
                d = self.daemons[name]
                _wait(d.healthy, timeout, f"{name} to become healthy (log: {d.log})")

        # etcd's members start together (each waits for a quorum), then meta; the chunk
        # servers and the redirector need both, and start together
        for group in (etcds, ["meta"], [*chunks, "redirector"]):
            start(group)
            wait(group)
        self.write_state()

    def stop_all(self) -> None:
        # Reverse start order: clients of etcd first, etcd last.
        for daemon in reversed(list(self.daemons.values())):
            daemon.stop()
        self.write_state()

    def reap(self) -> list[str]:
        """Notice children that exited on their own; returns their names."""
        died = []
        for daemon in self.daemons.values():
            proc = daemon.proc
            if proc is not None and daemon.exit_status is None and proc.poll() is not None:
                daemon.exit_status = proc.returncode
                if not daemon.stopped_by_user:
                    died.append(daemon.name)
        if died:
            self.write_state()
        return died

    async def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """One control-socket request: stop/start a daemon, or report the state.

        Children are started from the loop's own (main) thread: PR_SET_PDEATHSIG follows the
        thread that forked, so a child forked by a worker thread would die with that thread.
        """
        op = request.get("op")
        if op == "state":
            return {"ok": True, "state": self.state()}
        if op not in ("stop", "start"):
            return {"ok": False, "error": f"unknown request {op!r}"}
        name = str(request.get("name", ""))
        daemon = self.daemons.get(name)
        if daemon is None:
            return {
                "ok": False,
                "error": f"no daemon named {name!r} (known: {', '.join(self.daemons)})",
            }
        if op == "stop":
            if daemon.pid is None:
                return {"ok": False, "error": f"{name} is not running"}
            daemon.stopped_by_user = True
            daemon.signal(signal.SIGKILL if request.get("kill") else signal.SIGTERM)
            deadline = time.monotonic() + 10
            while daemon.proc is not None and daemon.proc.poll() is None:
                if time.monotonic() > deadline:
                    daemon.signal(signal.SIGKILL)
                await asyncio.sleep(0.05)
            daemon.exit_status = daemon.proc.returncode if daemon.proc is not None else None
        else:
            if daemon.pid is not None:
                return {"ok": False, "error": f"{name} is already running (pid {daemon.pid})"}
            daemon.start()
            self.write_state()
            deadline = time.monotonic() + 60
            try:
                while not daemon.healthy():
                    if time.monotonic() > deadline:
                        raise DevClusterError(f"timed out waiting for {name} (log: {daemon.log})")
                    await asyncio.sleep(0.1)
            except DevClusterError as exc:
                self.write_state()
                return {"ok": False, "error": str(exc)}
        self.write_state()
        return {"ok": True, "state": self.state()}


async def _serve(
    supervisor: Supervisor, stop: asyncio.Event, on_event: Callable[[str], None]
) -> None:
    """Answer control requests and watch children until `stop` is set."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            request = json.loads(line or b"{}")
            if request.get("op") == "down":
                reply: dict[str, Any] = {"ok": True}
                stop.set()
            else:
                reply = await supervisor.control(request)
        except (ValueError, AttributeError) as exc:
            reply = {"ok": False, "error": f"bad request: {exc}"}
        writer.write(json.dumps(reply).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    sock_path = supervisor.dir / CONTROL_SOCKET
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    server = await asyncio.start_unix_server(handle, path=str(sock_path))
    try:
        while not stop.is_set():
            for name in supervisor.reap():
                status = supervisor.daemons[name].exit_status
                on_event(
                    f"{name} exited with status {status} (not restarted; "
                    f"`lunastor dev start {name}` brings it back)"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()


def run_supervisor(
    directory: Path,
    layout: Layout,
    lease_ttl: float,
    on_ready: Callable[[dict[str, Any]], None],
    on_event: Callable[[str], None],
) -> int:
    """Start the cluster, call `on_ready(state)`, then serve until SIGTERM/SIGINT or `dev down`."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = read_state(directory, missing_ok=True)
    if existing and _pid_alive(int(existing.get("supervisor_pid") or 0)):
        raise DevClusterError(
            f"a dev cluster already runs in {directory} (pid {existing['supervisor_pid']}); "
            f"`lunastor dev down --dir {directory}` stops it"
        )
    supervisor = Supervisor(directory, layout, lease_ttl)
    supervisor.token = secrets.token_urlsafe(24)
    supervisor.plan()
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        supervisor.start_all()
        on_ready(supervisor.state())
        loop.run_until_complete(_serve(supervisor, stop, on_event))
    finally:
        supervisor.stop_all()
        loop.close()
    return 0


# -- client side: used by `lunastor dev down|stop|start` and `lunastor cluster status` ---------


def read_state(directory: Path, missing_ok: bool = False) -> dict[str, Any] | None:
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        if missing_ok:
            return None
        raise DevClusterError(
            f"no dev cluster in {directory} (no {STATE_FILE}); start one with `lunastor dev up`"
        ) from None
    except ValueError as exc:
        raise DevClusterError(f"{path} is not a valid state file: {exc}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise DevClusterError(f"{path}: unsupported state file version")
    return state


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def send_control(
    directory: Path, request: dict[str, Any], timeout: float = 120.0
) -> dict[str, Any]:
    import socket

    state = read_state(directory)
    assert state is not None
    if not _pid_alive(int(state.get("supervisor_pid") or 0)):
        raise DevClusterError(f"the dev cluster in {directory} is not running")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(directory / CONTROL_SOCKET))
        except OSError as exc:
            raise DevClusterError(f"cannot reach the dev cluster supervisor: {exc}") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data or b"{}")
    if not reply.get("ok"):
        raise DevClusterError(str(reply.get("error", "the supervisor refused the request")))
    return reply


def down(directory: Path, timeout: float = 60.0) -> bool:
    """Stop the dev cluster in `directory`; False when none was running."""
    state = read_state(directory, missing_ok=True)
    if state is None:
        return False
    pid = int(state.get("supervisor_pid") or 0)
    if not _pid_alive(pid):
        return False
    with contextlib.suppress(DevClusterError):
        send_control(directory, {"op": "down"}, timeout=10)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)  # children follow it (PR_SET_PDEATHSIG)
            break
        time.sleep(0.1)
    return True
