"""The redirector in a loopback dev cluster: discovery and redirected logins through the VIP.

`lunastor dev up` runs etcd, meta, three chunk servers and the redirector on 127.x addresses
(manage_vip off: the VIP is a 127.x address only the leader binds). The chunk servers register
in etcd but do not serve iSCSI yet, so a standalone lunastor target stands in for each one on
the portal its record advertises (see docs/redirector.md, "Tests").
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.devcluster import dev_up, lunastor
from tests.support.procs import wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("iscsi-inq") is None, reason="libiscsi-bin is not installed"
)
INITIATOR = "iqn.2026-11.org.example:dev-client"
OTHER = "iqn.2026-11.org.example:someone-else"


def api(state: dict[str, Any], method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        state["api_url"] + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={
            "Authorization": f"Bearer {state['admin_token']}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        text = resp.read()
        return json.loads(text) if text else None


class Standalone:
    """A standalone lunastor target serving `iqn` on `portal`, logging its connections."""

    def __init__(self, directory: Path, name: str, iqn: str, portal: str) -> None:
        self.log = directory / f"{name}.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lunastor.chunk.main",
                "standalone",
                "--file",
                str(directory / f"{name}.img"),
                "--size",
                str(8 << 20),
                "--iqn",
                iqn,
                "--listen",
                portal,
                "--lun",
                "1",
                "--log-level",
                "INFO",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
        )
        wait_for(lambda: "serving" in self.log.read_text(), 20, f"standalone target on {portal}")

    def sessions(self) -> int:
        """Connections that ended (each iscsi-inq / iscsi-ls run ends one)."""
        return self.log.read_text().count("closing iSCSI connection")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    directory = tmp_path_factory.mktemp("dev")
    state = dev_up(directory, chunks=3, lease_ttl=2.0)
    yield directory, state
    lunastor("dev", "down", "--dir", str(directory))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30)


def test_discovery_and_redirect_through_the_vip(
    cluster: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    _, state = cluster
    vip = state["portal"]
    vol = api(state, "POST", "/v1/volumes", {"name": "redir-dev", "size_bytes": 8 << 20})
    api(state, "POST", f"/v1/volumes/{vol['id']}/exports", {"initiator": INITIATOR})
    target, lun = vol["target_iqn"], vol["lun"]
    portals = {
        name: d["endpoints"]["portal"]
        for name, d in state["daemons"].items()
        if d["kind"] == "chunk"
    }
    targets = {n: Standalone(tmp_path, n, target, portal) for n, portal in portals.items()}
    try:
        # the portal answers once the leader is elected and the exports view has the LUN
        def discovered() -> str | None:
            out = run("iscsi-ls", "-i", INITIATOR, f"iscsi://{vip}")
            return out.stdout if target in out.stdout else None

        listing = wait_for(discovered, 30, "discovery through the VIP to list the target")
        assert listing.split() == [f"Target:{target}", f"Portal:{vip},1"]
        assert run("iscsi-ls", "-i", OTHER, f"iscsi://{vip}").stdout.strip() == ""

        before = {n: t.sessions() for n, t in targets.items()}
        inq = run("iscsi-inq", "-i", INITIATOR, f"iscsi://{vip}/{target}/{lun}")
        assert inq.returncode == 0, inq.stderr
        assert "Peripheral Device Type" in inq.stdout or "Device" in inq.stdout
        served = wait_for(
            lambda: [n for n, t in targets.items() if t.sessions() > before[n]] or None,
            10,
            "a standalone target to see the redirected session",
        )
        assert len(served) == 1
        # the same initiator and target are always sent to the same server
        again = run("iscsi-inq", "-i", INITIATOR, f"iscsi://{vip}/{target}/{lun}")
        assert again.returncode == 0, again.stderr
        wait_for(
            lambda: targets[served[0]].sessions() == before[served[0]] + 2,
            10,
            "the second session on the same server",
        )
        assert all(t.sessions() == before[n] for n, t in targets.items() if n != served[0])
        # an initiator the LUN is not published to is refused at the redirector
        refused = run("iscsi-inq", "-i", OTHER, f"iscsi://{vip}/{target}/{lun}")
        assert refused.returncode != 0
        metrics = urllib.request.urlopen(
            f"http://{state['daemons']['redirector']['endpoints']['admin']}/metrics", timeout=5
        ).read()
        assert b"lunastor_redirector_redirects_total" in metrics
        assert b'lunastor_redirector_login_failures_total{status="0x0202"}' in metrics
    finally:
        for t in targets.values():
            t.stop()
