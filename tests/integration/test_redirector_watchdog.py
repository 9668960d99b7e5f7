"""The VIP watchdog drops the address when renewals stop, or when its leader lets go."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.support.netns import Lab, netns_available
from tests.support.procs import wait_for

reason = netns_available()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")

VIP = "10.77.0.100"


def watchdog(cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*cmd, sys.executable, "-m", "lunastor.redirector.watchdog", f"{VIP}/32", "eth0"],
        stdin=subprocess.PIPE,
    )


@pytest.mark.parametrize(("how", "exit_status"), [("lapse", 1), ("close", 0)])
def test_watchdog_drops_the_vip(how: str, exit_status: int) -> None:
    with Lab() as lab:
        host = lab.add_host("red1")
        host.run("ip", "addr", "add", f"{VIP}/32", "dev", "eth0")
        proc = watchdog(host.cmd())
        assert proc.stdin is not None
        try:
            until = time.monotonic() + 1.0
            proc.stdin.write(b"%.6f\n" % until)
            proc.stdin.flush()
            if how == "lapse":
                # renewals keep it alive past the first permission...
                while time.monotonic() < until + 0.5:
                    proc.stdin.write(b"%.6f\n" % (time.monotonic() + 0.5))
                    proc.stdin.flush()
                    assert VIP in host.addresses()
                    time.sleep(0.1)
                started = time.monotonic()
            else:
                started = time.monotonic()
                proc.stdin.close()
            # ...and when they stop (or the leader lets go), the address goes
            wait_for(lambda: VIP not in host.addresses(), 5, "the watchdog to drop the VIP")
            assert time.monotonic() - started < 1.5
            assert proc.wait(5) == exit_status
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
