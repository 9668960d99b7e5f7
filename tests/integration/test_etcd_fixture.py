from __future__ import annotations

import json
import urllib.request

from tests.support.etcd import EtcdServer


def test_etcd_fixture_serves_the_v3_api(etcd_server: EtcdServer) -> None:
    req = urllib.request.Request(f"{etcd_server.url}/v3/maintenance/status", data=b"{}")
    with urllib.request.urlopen(req, timeout=5) as resp:
        status = json.loads(resp.read())
    assert status["version"].startswith("3.")
