"""GlusterFS replica 3 (Debian's glusterfs-server) on three brick directories: the replicated
anchor, reached by qemu-img through gfapi (`driver=gluster`).

Gluster refuses brick addresses on 127.x, so glusterd and its bricks run in a network namespace
of the bench's own, joined to the host by a veth pair: `<net>.1/24` on the host end,
`<net>.2/24` (the brick address) inside. The namespace has no default route: its daemons reach
only that /24 and their own loopback. glusterd's state and run directories live under the
bench's work directory, not /var/lib/glusterd. Down stops every process of the namespace
(SIGTERM, SIGKILL after 10 s), removes the sockets and brick logs glusterd put in /var/run and
/var/log, then the veth pair and the namespace.

Volume settings: Gluster's defaults but two (`SETTINGS`), so that an acknowledged write means
what it means for the iSCSI targets: on every replica, in its page cache. qemu-img opens the
image with O_DIRECT (cache.direct=on, as for every system); `performance.strict-o-direct`
makes the client's write-behind pass such writes through instead of acknowledging them before
any brick has them, and `network.remote-dio` drops O_DIRECT at the bricks, which write through
their page cache as tgt and lunastor do. Replication is client-side in Gluster (the AFR
translator runs inside qemu-img), so part of a replicated write's cost is the client's CPU: the
report prints the client's CPU beside the servers'.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from bench.qemu_img import gluster_opts
from bench.systems import listening, reap, reap_zombies, running
from tests.support.procs import wait_for

VOLUME = "gv0"
IMAGE = "bench.img"
GLUSTERD_PORT = 24007
SETTINGS = (("network.remote-dio", "enable"), ("performance.strict-o-direct", "on"))


def run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def free_subnet() -> str:
    """A 10.x.y /24 (as 'x.y.z' prefix) that no route or address of this host overlaps."""
    taken = [
        ipaddress.ip_network(word, strict=False)
        for line in run("ip", "-o", "-4", "addr", "show").stdout.splitlines()
        for word in line.split()
        if "/" in word and word[0].isdigit()
    ]
    for line in run("ip", "-4", "route", "show").stdout.splitlines():
        first = line.split()[0]
        if first[0].isdigit():
            taken.append(
                ipaddress.ip_network(first if "/" in first else f"{first}/32", strict=False)
            )
    while True:
        prefix = f"10.{random.randint(180, 250)}.{random.randint(0, 255)}"
        net = ipaddress.ip_network(f"{prefix}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return prefix


@dataclass
class GlusterNamespace:
    """Names and paths of one Gluster instance; `up()` / `down()` start and remove it."""

    workdir: Path
    name: str  # the network namespace
    prefix: str  # 10.x.y

    @property
    def host_if(self) -> str:
        return f"{self.name[:12]}-h"  # interface names: 15 characters at most

    @property
    def ns_if(self) -> str:
        return f"{self.name[:12]}-n"

    @property
    def server(self) -> str:
        return f"{self.prefix}.2"

    @property
    def socket(self) -> Path:
        return self.workdir / "run" / "glusterd.socket"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(
            "gluster", "--mode=script", f"--glusterd-sock={self.socket}",
            f"--log-file={self.workdir / 'log' / 'cli.log'}", *args, check=check,
        )  # fmt: skip

    def pids(self) -> list[int]:
        """Every process of the namespace: glusterd, the three bricks, the self-heal daemon."""
        out = run("ip", "netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]

    def up(self) -> None:
        for sub in ("b1", "b2", "b3", "state", "run", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        volfile = self.workdir / "glusterd.vol"
        volfile.write_text(
            "volume management\n"
            "    type mgmt/glusterd\n"
            f"    option working-directory {self.workdir / 'state'}\n"
            f"    option run-directory {self.workdir / 'run'}\n"
            f"    option glusterd-sockfile {self.socket}\n"
            "    option transport-type socket\n"
            f"    option transport.socket.listen-port {GLUSTERD_PORT}\n"
            "    option ping-timeout 0\n"
            "    option event-threads 1\n"
            "    option max-port 60999\n"
            "end-volume\n"
        )
        run("ip", "netns", "add", self.name)
        run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if,
            "netns", self.name)  # fmt: skip
        run("ip", "addr", "add", f"{self.prefix}.1/24", "dev", self.host_if)
        run("ip", "link", "set", self.host_if, "up")
        run("ip", "-n", self.name, "link", "set", "lo", "up")
        run("ip", "-n", self.name, "addr", "add", f"{self.server}/24", "dev", self.ns_if)
        run("ip", "-n", self.name, "link", "set", self.ns_if, "up")
        run(
            "ip", "netns", "exec", self.name, "glusterd", "-f", str(volfile),
            "-p", str(self.workdir / "glusterd.pid"),
            f"--log-file={self.workdir / 'log' / 'glusterd.log'}",
        )  # fmt: skip
        wait_for(lambda: self.cli("volume", "list").returncode == 0, 30, "glusterd to answer")
        wait_for(lambda: listening(self.server, GLUSTERD_PORT), 10, "glusterd through the veth")
        bricks = [f"{self.server}:{self.workdir / b}" for b in ("b1", "b2", "b3")]
        self.cli("volume", "create", VOLUME, "replica", "3", *bricks, "force")
        for key, value in SETTINGS:
            self.cli("volume", "set", VOLUME, key, value)
        self.cli("volume", "start", VOLUME)

        def bricks_online() -> bool:
            detail = self.cli("volume", "status", VOLUME, "detail", check=False).stdout
            online = [ln for ln in detail.splitlines() if ln.startswith("Online")]
            return len(online) == 3 and all(ln.rstrip().endswith("Y") for ln in online)

        wait_for(bricks_online, 60, "the three Gluster bricks to come online", interval=0.2)

    def create_image(self, size: int) -> None:
        # gfapi may need a moment after the bricks report online before a create succeeds
        url = f"gluster://{self.server}/{VOLUME}/{IMAGE}"  # qemu-img create has no --image-opts

        def created() -> bool:
            proc = run("qemu-img", "create", "-f", "raw", url, str(size), check=False)
            return proc.returncode == 0

        wait_for(created, 30, f"qemu-img create on Gluster volume {VOLUME}", interval=0.5)

    def version(self) -> str:
        lines = run("glusterd", "--version", check=False).stdout.splitlines()
        return lines[0] if lines else "glusterd (version unknown)"

    def down(self) -> None:
        """Stop everything `up` started; safe to call after a partial `up` and twice."""
        pids = self.pids()
        sockets, logs = [], []
        for pid in pids:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            for flag, value in itertools.pairwise(argv):
                if flag == b"-S":
                    sockets.append(Path(value.decode()))
                elif flag == b"-l":
                    logs.append(Path(value.decode()))
        self._signal_all(signal.SIGTERM, 10)
        self._signal_all(signal.SIGKILL, 5)
        reap_zombies("gluster")
        for path in sockets:
            path.unlink(missing_ok=True)
        for path in logs:
            if "/bricks/" in str(path) and path.is_file():
                shutil.move(path, self.workdir / "log" / path.name)
        run("ip", "link", "del", self.host_if, check=False)
        run("ip", "netns", "del", self.name, check=False)

    def _signal_all(self, sig: signal.Signals, wait: float) -> None:
        for pid in self.pids():
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            pids = self.pids()
            reap(pids)  # ours once orphaned, if the bench is a subreaper (become_subreaper)
            if not any(running(p) for p in pids):
                return
            time.sleep(0.1)


@dataclass(frozen=True)
class GlusterVolume:
    namespace: GlusterNamespace
    image_opts: str
    version: str


@contextmanager
def replica3(workdir: Path, size: int) -> Iterator[GlusterVolume]:
    """A replica-3 volume `gv0` with one raw image of `size` bytes; removed on exit."""
    if shutil.which("glusterd") is None:
        raise RuntimeError("glusterd is not installed: run scripts/bench-setup.sh")
    ns = GlusterNamespace(workdir=workdir, name=f"lsbench{os.getpid()}", prefix=free_subnet())
    try:
        ns.up()
        ns.create_image(size)
        opts = gluster_opts(ns.server, VOLUME, IMAGE)
        yield GlusterVolume(namespace=ns, image_opts=opts, version=ns.version())
    finally:
        ns.down()
