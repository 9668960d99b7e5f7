"""The virtual IP: added to an interface by the leader only, announced with gratuitous ARP.

The leader adds `vip/32` (or `/128`) to its interface with `ip addr add` and broadcasts a
gratuitous ARP so that neighbours (and switches) send the VIP's traffic to it at once. It
removes the address when it stops leading. A redirector starting up removes a VIP left behind
by a predecessor killed before it could clean up, before it campaigns.

The ARP frame is built here (`gratuitous_arp_frame`, pure) and sent on an AF_PACKET socket:
no external arping is needed.

While the VIP is held, a small guard process waits beside the redirector. It gets SIGTERM from
the kernel the moment the redirector dies, however it dies (PR_SET_PDEATHSIG), and removes the
address: a SIGKILLed leader does not leave the VIP behind while another instance takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import signal
import socket
import struct
from pathlib import Path

ETH_P_ARP = 0x0806
BROADCAST_MAC = b"\xff" * 6
PR_SET_PDEATHSIG = 1
# The guard: remove the address on SIGTERM (sent by the kernel when its parent dies) and exit.
GUARD_SCRIPT = (
    'trap \'ip addr del "$0" dev "$1" 2>/dev/null; exit 0\' TERM; '
    "while :; do sleep 3600 & wait; done"
)


def _term_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class VipError(Exception):
    """The VIP could not be added, removed or announced; the message says why."""


def parse_mac(text: str) -> bytes:
    parts = text.strip().split(":")
    if len(parts) != 6:
        raise VipError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


def gratuitous_arp_frame(mac: bytes, ip: str) -> bytes:
    """An Ethernet broadcast ARP request announcing `ip` at `mac` (RFC 5227 ARP announcement):
    sender and target protocol address are both the VIP."""
    addr = ipaddress.IPv4Address(ip).packed
    ethernet = BROADCAST_MAC + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)  # Ethernet, IPv4, request
    arp += mac + addr + b"\x00" * 6 + addr
    return ethernet + arp


async def _ip(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


class VipManager:
    """Adds, announces and removes one VIP on one interface (needs CAP_NET_ADMIN/NET_RAW)."""

    def __init__(self, vip: str, interface: str) -> None:
        self.address = ipaddress.ip_address(vip)
        self.interface = interface
        self.prefix = f"{vip}/{32 if self.address.version == 4 else 128}"
        self._guard: asyncio.subprocess.Process | None = None

    async def held(self) -> bool:
        status, out = await _ip("-o", "addr", "show", "dev", self.interface)
        if status != 0:
            raise VipError(f"cannot list addresses of {self.interface}: {out}")
        return any(
            f" {self.prefix} " in f" {line} " or f" {self.address}/" in line
            for line in out.splitlines()
        )

    async def acquire(self) -> None:
        if self._guard is None or self._guard.returncode is not None:
            self._guard = await asyncio.create_subprocess_exec(
                "sh",
                "-c",
                GUARD_SCRIPT,
                self.prefix,
                self.interface,
                preexec_fn=_term_with_parent,
                stdin=asyncio.subprocess.DEVNULL,
            )
        status, out = await _ip("addr", "add", self.prefix, "dev", self.interface)
        if status != 0 and "File exists" not in out and "already assigned" not in out:
            raise VipError(f"cannot add {self.prefix} to {self.interface}: {out}")
        await self.announce()

    async def release(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None and guard.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                guard.terminate()
            await guard.wait()
        status, out = await _ip("addr", "del", self.prefix, "dev", self.interface)
        if status != 0 and "Cannot assign" not in out and "not found" not in out.lower():
            raise VipError(f"cannot remove {self.prefix} from {self.interface}: {out}")

    async def announce(self, count: int = 3, interval: float = 0.2) -> None:
        """Send gratuitous ARPs (IPv4 only; IPv6 neighbours learn from unsolicited NAs)."""
        if self.address.version != 4:
            return
        mac_path = Path("/sys/class/net") / self.interface / "address"
        try:
            mac = parse_mac(mac_path.read_text())
        except OSError as exc:
            raise VipError(f"cannot read the MAC of {self.interface}: {exc}") from None
        if mac == b"\x00" * 6:
            return  # loopback: nobody to tell
        frame = gratuitous_arp_frame(mac, str(self.address))
        try:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
                s.bind((self.interface, ETH_P_ARP))
                for i in range(count):
                    s.send(frame)
                    if i + 1 < count:
                        await asyncio.sleep(interval)
        except OSError as exc:
            raise VipError(f"cannot send gratuitous ARP on {self.interface}: {exc}") from None
