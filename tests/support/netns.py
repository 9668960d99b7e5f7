"""A small lab of network namespaces: one bridge, hosts attached to it by veth pairs.

Every address lives inside namespaces the test creates (10.77.0.0/24 on a bridge in a hub
namespace), so test traffic never leaves them. `Lab` removes everything it made on close.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from dataclasses import dataclass, field

_counter = itertools.count()


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def netns_available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"lsprobe{os.getpid()}"
    proc = run("ip", "netns", "add", name, check=False)
    if proc.returncode != 0:
        return f"ip netns add failed: {proc.stderr.strip()}"
    run("ip", "netns", "del", name, check=False)
    return None


@dataclass
class Host:
    name: str  # the namespace
    address: str  # 10.77.0.N, on its eth0
    interface: str = "eth0"

    def cmd(self, *args: str) -> list[str]:
        """A command line that runs `args` inside this host's namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(*self.cmd(*args), check=check)

    def addresses(self) -> set[str]:
        out = run("ip", "-n", self.name, "-o", "-4", "addr", "show", "dev", self.interface).stdout
        return {line.split()[3].split("/")[0] for line in out.splitlines()}

    def link(self, up: bool) -> None:
        """Take this host's link down (as if it lost power or its cable) or back up."""
        run("ip", "-n", self.name, "link", "set", self.interface, "up" if up else "down")


@dataclass
class Lab:
    subnet: str = "10.77.0"
    tag: str = field(default_factory=lambda: f"ls{os.getpid() % 100000}x{next(_counter)}")
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def hub(self) -> str:
        return f"{self.tag}hub"

    def __enter__(self) -> Lab:
        run("ip", "netns", "add", self.hub)
        run("ip", "-n", self.hub, "link", "set", "lo", "up")
        run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.hub, "link", "set", "br0", "up")
        return self

    def add_host(self, role: str) -> Host:
        index = len(self.hosts) + 1
        ns = f"{self.tag}{role}"
        host = Host(ns, f"{self.subnet}.{index}")
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        peer = f"v{index}"
        run(
            "ip",
            "-n",
            self.hub,
            "link",
            "add",
            peer,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        )
        run("ip", "-n", self.hub, "link", "set", peer, "master", "br0", "up")
        run("ip", "-n", ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        self.hosts[role] = host
        return host

    def __exit__(self, *exc: object) -> None:
        for host in self.hosts.values():
            # kill anything still running in the namespace before deleting it
            pids = run("ip", "netns", "pids", host.name, check=False).stdout.split()
            for pid in pids:
                run("kill", "-9", pid, check=False)
            run("ip", "netns", "del", host.name, check=False)
        run("ip", "netns", "del", self.hub, check=False)
