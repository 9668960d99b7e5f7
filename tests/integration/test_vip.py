"""The VIP is added, announced by gratuitous ARP, and removed, inside test namespaces."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from lunastor.redirector.vip import gratuitous_arp_frame, parse_mac
from tests.support.netns import Host, Lab, netns_available
from tests.support.procs import wait_for

reason = netns_available()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")

VIP = "10.77.0.100"


def test_gratuitous_arp_frame_layout() -> None:
    mac = parse_mac("02:00:00:00:00:01")
    frame = gratuitous_arp_frame(mac, "10.0.0.9")
    assert len(frame) == 42
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac and frame[12:14] == b"\x08\x06"
    assert frame[14:22] == bytes.fromhex("0001080006040001")
    assert frame[22:28] == mac and frame[28:32] == bytes([10, 0, 0, 9])
    assert frame[32:38] == b"\x00" * 6 and frame[38:42] == bytes([10, 0, 0, 9])


HOLDER = f"""
import asyncio, sys
from lunastor.redirector.vip import VipManager
async def main():
    vip = VipManager({VIP!r}, "eth0")
    for line in sys.stdin:
        await getattr(vip, line.strip())()
        print("done", flush=True)
asyncio.run(main())
"""


class VipHolder:
    """A process in `host`'s namespace holding a VipManager, driven line by line."""

    def __init__(self, host: Host) -> None:
        self.proc = subprocess.Popen(
            host.cmd(sys.executable, "-c", HOLDER),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def do(self, op: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(op + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "done", f"{op} failed"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_acquire_announces_and_release_removes() -> None:
    with Lab() as lab:
        leader, other, client = (lab.add_host(r) for r in ("red1", "red2", "client"))
        first, second = VipHolder(other), VipHolder(leader)
        try:
            # the client first learns the VIP at `other` (a stale owner), as after a failover
            first.do("acquire")
            client.run("ping", "-c", "1", "-W", "2", VIP)
            other_mac = other.run("cat", "/sys/class/net/eth0/address").stdout.strip()
            assert other_mac in client.run("ip", "neigh", "show", VIP).stdout
            first.do("release")
            assert VIP not in other.addresses()
            second.do("acquire")
            assert VIP in leader.addresses()
            leader_mac = leader.run("cat", "/sys/class/net/eth0/address").stdout.strip()
            # the gratuitous ARP moved the client's neighbour entry without it asking
            wait_for(
                lambda: leader_mac in client.run("ip", "neigh", "show", VIP).stdout,
                5,
                "the client's ARP entry to follow the VIP",
            )
            assert other_mac != leader_mac
            client.run("ping", "-c", "1", "-W", "2", VIP)
            second.do("acquire")  # idempotent
            second.do("release")
            second.do("release")  # idempotent
            assert VIP not in leader.addresses()
        finally:
            first.kill()
            second.kill()


def test_a_sigkilled_holder_does_not_leave_the_vip_behind() -> None:
    with Lab() as lab:
        host = lab.add_host("red1")
        holder = VipHolder(host)
        try:
            holder.do("acquire")
            assert VIP in host.addresses()
        finally:
            holder.kill()
        wait_for(
            lambda: VIP not in host.addresses(),
            5,
            "the guard to remove the VIP after its holder was SIGKILLed",
        )


def test_held_reports_the_address() -> None:
    async def check() -> None:
        from lunastor.redirector.vip import VipManager

        m = VipManager("127.0.0.1", "lo")
        assert await m.held()
        assert not await VipManager("127.77.77.77", "lo").held()

    asyncio.run(check())
