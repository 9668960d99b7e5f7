"""A real dev cluster (`lunastor dev up`: etcd, meta, three chunk servers in zone1..zone3, the
redirector) and a real `lunastor-csi --mode controller` process on a unix socket, called over
gRPC the way the CSI sidecars call it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lunastor.csi import csi_pb2 as pb
from lunastor.csi.client import CsiClient
from tests.support.devcluster import dev_up, lunastor
from tests.support.procs import wait_for

Mode = pb.VolumeCapability.AccessMode.Mode


def mount_cap(mode: int = Mode.SINGLE_NODE_WRITER, fs_type: str = "") -> pb.VolumeCapability:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=pb.VolumeCapability.AccessMode(mode=mode),  # type: ignore[arg-type]
    )


def block_cap(mode: int = Mode.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    return pb.VolumeCapability(
        block=pb.VolumeCapability.BlockVolume(),
        access_mode=pb.VolumeCapability.AccessMode(mode=mode),  # type: ignore[arg-type]
    )


@dataclass
class Plugin:
    endpoint: str
    proc: subprocess.Popen[bytes]
    log: Path


def start_plugin(directory: Path, name: str, *settings: str, mode: str = "controller") -> Plugin:
    sock = directory / f"{name}.sock"
    log = directory / f"{name}.log"
    argv = [sys.executable, "-m", "lunastor.csi.main", "--mode", mode]
    argv += ["--endpoint", f"unix://{sock}"]
    for s in settings:
        argv += ["--set", s]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: sock.exists() or proc.poll() is not None, 30, f"{name} to listen")
    assert proc.poll() is None, log.read_text()
    return Plugin(f"unix://{sock}", proc, log)


def stop_plugin(plugin: Plugin) -> int:
    plugin.proc.send_signal(signal.SIGTERM)
    return plugin.proc.wait(30)


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("csi") / "dev"
    state = dev_up(directory, chunks=3, lease_ttl=2.0)
    state["dir"] = str(directory)
    try:
        yield state
    finally:
        lunastor("dev", "down", "--dir", str(directory), check=False)


@pytest.fixture(scope="package")
def controller(
    cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Plugin]:
    directory = tmp_path_factory.mktemp("csi-controller")
    plugin = start_plugin(
        directory,
        "controller",
        f"api_url={cluster['api_url']}",
        f"api_token={cluster['csi_token']}",
    )
    try:
        yield plugin
    finally:
        assert stop_plugin(plugin) == 0, plugin.log.read_text()[-3000:]


@pytest.fixture
async def csi(controller: Plugin) -> AsyncIterator[CsiClient]:
    client = CsiClient(controller.endpoint)
    try:
        yield client
    finally:
        await client.close()


QEMU_IQN = "iqn.2008-11.org.linux-kvm"  # the initiator name qemu-io logs in with


def qemu_io(url: str, command: str) -> None:
    """Run one qemu-io command against `url` (iscsi://portal/target/lun), waiting for the
    LUN to answer first: a fresh export reaches the chunk servers through their etcd watch."""

    def answers() -> bool:
        inq = ["iscsi-inq", "-i", QEMU_IQN, url]
        return subprocess.run(inq, capture_output=True, timeout=20, check=False).returncode == 0

    wait_for(answers, 30, f"{url} to answer INQUIRY")
    proc = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", command, url], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"
