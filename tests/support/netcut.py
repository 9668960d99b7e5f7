"""Partitions inside a lab of network namespaces (tests/support/netns.py).

`cut` drops the packets a lab host exchanges with chosen peers, both ways or one way only, with
nftables rules in that host's own namespace (packets dropped, never rejected: the other side
sees silence, as with a failed switch or a firewall). Links stay up and every other peer is
still reached, which a link taken down (`Host.link`) cannot do. `heal` removes the rules.

Also what a test needs to look at inside a namespace: a link's MAC address, the MAC a host's
ARP table holds for an address, and a daemon's Prometheus metrics.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from prometheus_client.parser import text_string_to_metric_families

from tests.support.netns import Host

TABLE = "lunastor_cut"


def cut(host: Host, peers: Iterable[str], *, outgoing: bool = True, incoming: bool = True) -> None:
    """Drop what `host` sends to (`outgoing`) and/or receives from (`incoming`) each address
    in `peers`; adds to a cut already in place."""
    rules = [
        f"add table inet {TABLE}",
        f"add chain inet {TABLE} in {{ type filter hook input priority 0 ; }}",
        f"add chain inet {TABLE} out {{ type filter hook output priority 0 ; }}",
    ]
    for peer in peers:
        if outgoing:
            rules.append(f"add rule inet {TABLE} out ip daddr {peer} drop")
        if incoming:
            rules.append(f"add rule inet {TABLE} in ip saddr {peer} drop")
    proc = subprocess.run(
        host.cmd("nft", "-f", "-"),
        input="\n".join(rules) + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"nft in {host.name}: {proc.stderr.strip()}")


def heal(host: Host) -> None:
    """Remove every cut `cut` made in `host` (nothing to do when there is none)."""
    host.run("nft", "delete", "table", "inet", TABLE, check=False)


@contextmanager
def partition(
    host: Host, peers: Iterable[str], *, outgoing: bool = True, incoming: bool = True
) -> Iterator[None]:
    """`cut` for the duration of the block, healed however it ends."""
    cut(host, peers, outgoing=outgoing, incoming=incoming)
    try:
        yield
    finally:
        heal(host)


def mac(host: Host) -> str:
    """The MAC address of `host`'s interface."""
    out = host.run("cat", f"/sys/class/net/{host.interface}/address").stdout
    return out.strip().lower()


def neighbour(host: Host, address: str) -> str | None:
    """The MAC address `host`'s ARP table holds for `address`, None without a usable entry."""
    out = host.run("ip", "neigh", "show", address, "dev", host.interface, check=False).stdout
    for line in out.splitlines():
        words = line.split()
        if "lladdr" in words and "FAILED" not in words and "INCOMPLETE" not in words:
            return words[words.index("lladdr") + 1].lower()
    return None


def metric(host: Host, port: int, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`, from the /metrics of the
    daemon listening on `host`'s address and `port` (read inside `host`)."""
    url = f"http://{host.address}:{port}/metrics"
    text = host.run("curl", "-sf", "-m", "5", url).stdout
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total
