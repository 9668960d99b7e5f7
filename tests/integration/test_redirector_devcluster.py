"""The redirector in a loopback dev cluster: discovery and redirected logins through the VIP.

`lunastor dev up` runs etcd, meta, three chunk servers and the redirector on 127.x addresses
(manage_vip off: the VIP is a 127.x address only the leader binds). Every chunk server serves
the volume's LUN through the replicated data path; the redirector sends each initiator to the
one rendezvous hashing picks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lunastor.redirector.choose import ServerChoice, choose_chunk_server
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


def normal_logins(admin: str) -> float:
    """A chunk server's count of normal-session logins, from its /metrics."""
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    match = re.search(r'^lunastor_iscsi_logins_total\{type="normal"\} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


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
    chunks = {
        d["endpoints"]["portal"]: d["endpoints"]["admin"]
        for d in state["daemons"].values()
        if d["kind"] == "chunk"
    }
    view = api(state, "GET", "/v1/cluster")
    servers = [ServerChoice(c["id"], c["state"]) for c in view["chunk_servers"]]
    portal_of = {c["id"]: c["portal"] for c in view["chunk_servers"]}
    expected = portal_of[choose_chunk_server(INITIATOR, target, servers) or ""]

    # the portal answers once the leader is elected and the exports view has the LUN
    def discovered() -> str | None:
        out = run("iscsi-ls", "-i", INITIATOR, f"iscsi://{vip}")
        return out.stdout if target in out.stdout else None

    listing = wait_for(discovered, 30, "discovery through the VIP to list the target")
    assert listing.split() == [f"Target:{target}", f"Portal:{vip},1"]
    assert run("iscsi-ls", "-i", OTHER, f"iscsi://{vip}").stdout.strip() == ""

    before = {portal: normal_logins(admin) for portal, admin in chunks.items()}
    inq = run("iscsi-inq", "-i", INITIATOR, f"iscsi://{vip}/{target}/{lun}")
    assert inq.returncode == 0, inq.stderr
    assert "LUNASTOR" in inq.stdout
    # the session went to the hashed chunk server, and to no other
    after = {portal: normal_logins(admin) for portal, admin in chunks.items()}
    assert after[expected] == before[expected] + 1
    assert all(after[p] == before[p] for p in chunks if p != expected)
    # data written through the VIP reads back through another chunk server directly
    image = tmp_path / "data.img"
    image.write_bytes(os.urandom(4 << 20))

    def lun_opts(portal: str) -> str:  # qemu's iscsi driver, as this initiator
        return (
            f"driver=iscsi,transport=tcp,portal={portal},target={target},lun={lun},"
            f"initiator-name={INITIATOR}"
        )

    conv = run(
        "qemu-img", "convert", "-n", "-f", "raw", str(image), "--target-image-opts", lun_opts(vip)
    )
    assert conv.returncode == 0, conv.stderr
    other = next(p for p in chunks if p != expected)
    back = run(
        "qemu-img", "compare", "--image-opts", f"driver=file,filename={image}", lun_opts(other)
    )
    assert back.returncode == 0 and "identical" in back.stdout, back.stdout + back.stderr
    # an initiator the LUN is not published to is refused at the redirector
    refused = run("iscsi-inq", "-i", OTHER, f"iscsi://{vip}/{target}/{lun}")
    assert refused.returncode != 0
    metrics = urllib.request.urlopen(
        f"http://{state['daemons']['redirector']['endpoints']['admin']}/metrics", timeout=5
    ).read()
    assert b"lunastor_redirector_redirects_total" in metrics
    assert b'lunastor_redirector_login_failures_total{status="0x0202"}' in metrics
