"""A watchdog beside the leader: drops the VIP when the leader stops renewing its hold on it.

The leader steps down on its own at `lease deadline - vip_release_margin` (main.py). A leader
that is frozen (SIGSTOP, a paused VM, a stalled event loop) cannot, and the VIP guard of
`vip.py` only fires when the leader *dies*. So while leading, the redirector runs this small
process and keeps telling it, on its stdin, until when it may hold the VIP: one line per
renewal, a `time.monotonic()` value (CLOCK_MONOTONIC, the same clock in every process of the
host). When that moment passes without a newer one, or stdin reaches end of file (the leader
exited or let go), the watchdog removes the address and exits.

    python -m lunastor.redirector.watchdog <vip>/<prefix length> <interface>
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import subprocess
import sys
import time


def drop(prefix: str, interface: str) -> None:
    subprocess.run(
        ["ip", "addr", "del", prefix, "dev", interface],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )


def watch(fd: int, prefix: str, interface: str) -> str:
    """Return why the VIP was dropped: "lapsed" or "released"."""
    until: float | None = None
    pending = b""
    while True:
        timeout = None if until is None else max(0.0, until - time.monotonic())
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            drop(prefix, interface)
            return "lapsed"
        data = os.read(fd, 4096)
        if not data:
            drop(prefix, interface)
            return "released"
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            try:
                until = float(line)
            except ValueError:
                continue  # not ours; the next renewal counts


class Watchdog:
    """The leader's handle on its watchdog process."""

    def __init__(self, prefix: str, interface: str) -> None:
        self.prefix = prefix
        self.interface = interface
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self, until: float) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lunastor.redirector.watchdog",
            self.prefix,
            self.interface,
            stdin=asyncio.subprocess.PIPE,
        )
        self.renew(until)

    def renew(self, until: float) -> None:
        """Allow holding the VIP until `until` (a time.monotonic() value)."""
        proc = self._proc
        if proc is not None and proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write(b"%.6f\n" % until)

    @property
    def lapsed(self) -> bool:
        """True once the watchdog dropped the VIP because renewals stopped coming."""
        return self._proc is not None and self._proc.returncode is not None

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            await asyncio.wait_for(proc.wait(), 5)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m lunastor.redirector.watchdog VIP/LEN INTERFACE", file=sys.stderr)
        return 2
    reason = watch(sys.stdin.fileno(), args[0], args[1])
    return 0 if reason == "released" else 1


if __name__ == "__main__":
    sys.exit(main())
