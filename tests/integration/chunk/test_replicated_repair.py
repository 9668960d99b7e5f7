"""Read repair in a real dev cluster: a replica file corrupted on disk is detected by its
checksum when read through the chunk server holding it, the initiator still gets the right
data, and the bad copy is rewritten from a good replica (docs/datapath.md, "Reads")."""

from __future__ import annotations

import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.chunk.test_replicated_cluster import (
    QEMU_IQN,
    Cluster,
    _extents,
    _target_url,
    _wait_lun,
    run,
)
from tests.support.devcluster import dev_up, lunastor

MIB = 1 << 20
BLOCK = 4096
BAD_BLOCK = 37  # a written block of extent 0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    state = dev_up(tmp_path / "dev", chunks=3, lease_ttl=2.0)
    try:
        yield Cluster(tmp_path / "dev", state)
    finally:
        lunastor("dev", "down", "--dir", str(tmp_path / "dev"), check=False)


def repairs(cluster: Cluster, name: str) -> float:
    """`lunastor_checksum_repairs_total` from one chunk server's /metrics (0 if absent)."""
    admin = cluster.state["daemons"][name]["endpoints"]["admin"]
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    match = re.search(r"^lunastor_checksum_repairs_total ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_corrupted_replica_is_read_around_and_rewritten(cluster: Cluster, tmp_path: Path) -> None:
    vol = cluster.create_exported_volume("repair1", "16MiB", QEMU_IQN)
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(1 * MIB))
    write_url = _target_url(cluster.portal(cluster.chunks[0]), vol["target_iqn"], vol["lun"])
    _wait_lun(write_url, QEMU_IQN)
    conv = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), write_url)
    assert conv.returncode == 0, conv.stderr

    # The primary of extent 0 reads its own replica first and needs no read lease to do so,
    # so reading through its portal is certain to meet the bad copy.
    extent = _extents(cluster.state, vol["id"])[0]
    assert len(extent.replicas) == 3
    holder = cluster.name_of(extent.primary)
    dat = cluster.dir / "data" / holder / "extents" / vol["id"] / f"{0:016x}.dat"
    good = image.read_bytes()
    assert dat.read_bytes()[: len(good)] == good
    with open(dat, "r+b") as f:  # flip 16 bytes in the middle of one block
        at = BAD_BLOCK * BLOCK + 1000
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in good[at : at + 16]))
    assert dat.read_bytes()[: len(good)] != good
    before = repairs(cluster, holder)

    url = _target_url(cluster.portal(holder), vol["target_iqn"], vol["lun"])
    _wait_lun(url, QEMU_IQN)
    out = tmp_path / "read.raw"
    conv = run("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(out))
    assert conv.returncode == 0, conv.stderr
    assert out.read_bytes()[: len(good)] == good, "the initiator got the corrupted bytes"

    # repaired before the read returned: the file is right again, and one block was counted
    assert dat.read_bytes()[: len(good)] == good, "the bad copy was not rewritten"
    assert repairs(cluster, holder) == before + 1
    for other in cluster.chunks:  # the good replicas were left alone
        path = cluster.dir / "data" / other / "extents" / vol["id"] / f"{0:016x}.dat"
        assert path.read_bytes()[: len(good)] == good
