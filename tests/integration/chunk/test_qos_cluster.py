"""Per-volume QoS with real clients on a real dev cluster (docs/qos.md): bench/iscsi_load.c
(libiscsi) drives a limited volume through a chunk server's iSCSI portal; the limits are set
and changed through the REST API, and the access point's own /metrics shows when a change
took effect."""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import iscsi_load
from bench.systems import BENCH_INITIATOR
from lunastor.common.volume_io import parse
from tests.support.devcluster import dev_up, lunastor

MIB = 1 << 20


class Cluster:
    def __init__(self, directory: Path, state: dict[str, Any]) -> None:
        self.dir = directory
        self.state = state

    def api(self, method: str, path: str, body: Any = None) -> Any:
        req = urllib.request.Request(
            self.state["api_url"] + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={
                "Authorization": f"Bearer {self.state['admin_token']}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def volume(self, name: str, qos: dict[str, int], replicas: int = 2) -> dict[str, Any]:
        body = {"name": name, "size_bytes": 256 * MIB, "replicas": replicas, "qos": qos}
        vol = self.api("POST", "/v1/volumes", body)
        self.api("POST", f"/v1/volumes/{vol['id']}/exports", {"initiator": BENCH_INITIATOR})
        return dict(vol)

    def url(self, chunk: str, vol: dict[str, Any]) -> str:
        portal = self.state["daemons"][chunk]["endpoints"]["portal"]
        return f"iscsi://{portal}/{vol['target_iqn']}/{vol['lun']}"

    def ops(self, chunk: str, volume_id: str, op: str) -> float:
        """The commands of `op` the access point `chunk` completed for the volume so far."""
        admin = self.state["daemons"][chunk]["endpoints"]["admin"]
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return parse(text, volume_id).ops[op].ops


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("qos") / "dev"
    state = dev_up(directory, chunks=3, lease_ttl=2.0)
    try:
        yield Cluster(directory, state)
    finally:
        lunastor("dev", "down", "--dir", str(directory), check=False)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return iscsi_load.build(tmp_path_factory.mktemp("iscsi-load"))


def _wait_served(cluster: Cluster, client: Path, url: str) -> None:
    deadline = time.monotonic() + 90  # a fresh cluster on a loaded machine is slow to serve
    while True:
        try:
            iscsi_load.run(client, url, iscsi_load.Load(False, False, 4096, 1), 0.1, MIB)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_limited_volume_measures_within_5_percent_of_its_limits_over_10_s(
    cluster: Cluster, client: Path
) -> None:
    vol = cluster.volume("qos-iops", {"read_iops": 100, "write_bps": 1_000_000})
    url = cluster.url("chunk1", vol)
    _wait_served(cluster, client, url)
    time.sleep(0.2)  # the bucket refills (it holds 50 ms of the rate)
    # QD64: enough in flight that the limiter, not a loaded machine's latency (reads of 200 ms
    # seen under a load average of 30 on 2 cores), sets the rate
    reads = iscsi_load.run(client, url, iscsi_load.Load(False, True, 4096, 64), 10, 64 * MIB)
    print(f"read_iops 100: {reads.iops} IOPS over {reads.seconds} s")
    assert reads.errors == 0
    assert abs(reads.iops - 100) <= 0.05 * 100, reads
    # QD16 of 64 KiB: far more than 1 MB/s even on a loaded machine (4 in flight were not)
    writes = iscsi_load.run(client, url, iscsi_load.Load(True, False, 65536, 16), 10, 64 * MIB)
    print(f"write_bps 1 MB/s: {writes.mbps} MB/s over {writes.seconds} s")
    assert writes.errors == 0
    assert abs(writes.mbps - 1.0) <= 0.05 * 1.0, writes  # MB/s of 10^6 bytes


def test_a_burst_is_allowed_as_configured_and_no_more(cluster: Cluster, client: Path) -> None:
    # after idling: 2 s at up to 400 IOPS, then 100: over 10 s, 100 * 10 plus the burst
    # bucket, (400 - 100) * 2 + 50 ms of 100
    vol = cluster.volume(
        "qos-burst", {"read_iops": 100, "read_iops_burst": 400, "burst_seconds": 2}
    )
    url = cluster.url("chunk1", vol)
    _wait_served(cluster, client, url)
    time.sleep(6.5)  # the probe's commands are paid back and the bucket is full again
    reads = iscsi_load.run(client, url, iscsi_load.Load(False, True, 4096, 64), 10, 64 * MIB)
    want = (100 * 10 + (400 - 100) * 2 + 5) / 10
    print(f"read_iops 100, burst 400 for 2 s: {reads.iops} IOPS over {reads.seconds} s")
    assert reads.errors == 0
    assert abs(reads.iops - want) <= 0.05 * want, (want, reads)


def test_a_limit_changed_online_takes_effect_within_1_s_on_an_open_session(
    cluster: Cluster, client: Path
) -> None:
    vol = cluster.volume("qos-online", {"read_iops": 20})
    url = cluster.url("chunk2", vol)
    _wait_served(cluster, client, url)
    load = iscsi_load.start(client, url, iscsi_load.Load(False, True, 4096, 32), 8, 64 * MIB)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), cluster.ops("chunk2", vol["id"], "read")))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        time.sleep(3)
        changed = time.monotonic()
        cluster.api("PATCH", f"/v1/volumes/{vol['id']}", {"qos": {"read_iops": 400}})
        time.sleep(3)
    finally:
        stop.set()
        sampler.join()
        result = iscsi_load.finish(load, 8)
    assert result.errors == 0

    def rate(start: float, end: float) -> float:
        inside = [(t, n) for t, n in samples if start <= t <= end]
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    assert rate(changed - 2, changed) <= 20 * 1.2, samples
    # the first moment the open session runs well above the old limit
    effect = next(
        t
        for (t0, n0), (t, n) in itertools.pairwise(samples)
        if t0 >= changed and (n - n0) / (t - t0) > 3 * 20
    )
    print(f"20 -> 400 IOPS: in effect after {effect - changed:.2f} s")
    assert effect - changed <= 1.0, (effect - changed, samples)
    # well above the old limit from then on, never above the new one (on a loaded machine
    # 32 commands in flight may not reach 400 IOPS: that is the machine, not the limit)
    after = rate(changed + 1, changed + 3)
    print(f"20 -> 400 IOPS: {after:.0f} IOPS 1-3 s after the change")
    assert 5 * 20 <= after <= 400 * 1.1, samples


def test_volume_stats_shows_the_limited_rate_and_the_time_throttled(
    cluster: Cluster, client: Path
) -> None:
    vol = cluster.volume("qos-stats", {"read_iops": 100})
    url = cluster.url("chunk3", vol)
    _wait_served(cluster, client, url)
    load = iscsi_load.start(client, url, iscsi_load.Load(False, True, 4096, 8), 60, 64 * MIB)
    try:
        time.sleep(1)
        out = lunastor(
            "volume", "stats", "qos-stats", "--count", "3", "--json", "--dir", str(cluster.dir)
        ).stdout
        table = lunastor(
            "volume", "stats", "qos-stats", "--count", "1", "--dir", str(cluster.dir)
        ).stdout
    finally:
        load.kill()  # enough seen: no need to wait for its end
        load.wait()
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 3
    reads = [line["read"] for line in lines]
    print("volume stats at read_iops 100:", reads)
    # never above the limit (+ the bucket and a sampling edge); below it only when a loaded
    # machine cannot keep 8 commands in flight
    assert all(50 <= r["iops"] <= 120 for r in reads), reads
    # 8 commands in flight, about 7 of them waiting for the limiter at any moment
    assert all(r["throttled_per_second"] > 3 for r in reads), reads
    assert all(r["latency_p99_ms_le"] is not None for r in reads)
    assert "read_iops=100" in table and "IOPS" in table and "throttled" in table


def test_two_sessions_on_two_access_points_share_one_limit(cluster: Cluster, client: Path) -> None:
    vol = cluster.volume("qos-shared", {"read_iops": 200})
    urls = [cluster.url("chunk1", vol), cluster.url("chunk2", vol)]
    for url in urls:
        _wait_served(cluster, client, url)
    time.sleep(3)  # the probes' demand is withdrawn (IDLE): a fresh start for both
    load = iscsi_load.Load(False, True, 4096, 16)
    procs = [iscsi_load.start(client, url, load, 10, 64 * MIB) for url in urls]
    one, two = (iscsi_load.finish(p, 10) for p in procs)
    total = one.iops + two.iops
    print(f"read_iops 200 over two access points: {one.iops} + {two.iops} = {total} IOPS")
    assert one.errors == 0 and two.errors == 0
    assert abs(total - 200) <= 0.05 * 200, (one, two)
    # and split evenly, both wanting more than half
    assert min(one.iops, two.iops) >= 0.4 * 200, (one, two)
