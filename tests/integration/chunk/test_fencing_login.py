"""Nexus epochs with a real iSCSI client: libiscsi sessions (tests/tools/nexus_client.c) log in
through two access points of an in-process cluster (real etcd, real data nodes, the chunk
server's `EtcdTargetHost` and `IscsiServer` with its `NexusEpochs` observer).

The same I_T nexus (initiator IQN + ISID) logs in through a second access point and writes;
the first session, still connected to the old access point, then writes the same block: with
fencing its write is refused (ABORTED COMMAND, I_T NEXUS LOSS OCCURRED) and the newer data
stays; the other path of the initiator (another ISID) keeps writing. Without fencing the old
session's write lands. The in-flight variant of the race (a write delayed on the chunk link)
is in test_fencing.py.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lunastor.chunk.access.iscsi_server import IscsiServer, ServerConfig
from lunastor.chunk.access.targets import EtcdTargetHost
from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.records import Keys, LunRecord, VolumeRecord, target_iqn
from lunastor.iscsi.scsi.types import Nexus
from tests.integration.chunk.test_replication import EXTENT, Cluster, Node
from tests.support.etcd import EtcdServer
from tests.support.procs import async_wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or not Path("/usr/include/iscsi/iscsi.h").exists(),
    reason="gcc and libiscsi-dev are needed",
)
TOOL = Path(__file__).resolve().parents[2] / "tools" / "nexus_client.c"
HOST = "iqn.2026-11.org.example:nexus-client"
TGT = target_iqn(0)
VOL = "vol-t"
PATH_A = (0x123456, 1)  # ISID of the failing-over session (random type: 0x80, rnd, qualifier)
PATH_B = (0x123456, 2)  # the initiator's other multipath session


def isid(path: tuple[int, int]) -> int:
    return (0x80 << 40) | (path[0] << 16) | path[1]


@pytest.fixture
async def etcd(etcd_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[Etcd]:
    config = EtcdConfig(endpoints=[etcd_server.endpoint], namespace=etcd_prefix, timeout=5)
    async with await Etcd.connect(config) as client:
        yield client


@pytest.fixture(scope="module")
def client_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tools") / "nexus-client"
    build = subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(out), str(TOOL), "-liscsi"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    return out


class Client:
    """The scripted libiscsi client: one command line in, one answer line out."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, binary: Path) -> Client:
        proc = await asyncio.create_subprocess_exec(
            str(binary),
            HOST,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def __call__(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        async with asyncio.timeout(60):
            return (await self.proc.stdout.readline()).decode().strip()

    async def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        async with asyncio.timeout(30):
            await self.proc.wait()


async def serve_iscsi(etcd: Etcd, node: Node, port: int) -> tuple[EtcdTargetHost, IscsiServer]:
    host = EtcdTargetHost(
        etcd,
        node.path,
        EXTENT,
        relative_port=lambda: port,
        relative_ports=lambda: [1, 2, 3],
        sealer=None,
    )
    await host.start()
    server = IscsiServer(
        host,
        ServerConfig(listen=[("127.0.0.1", 0)], relative_port=port),
        observer=node.epochs,
    )
    host.server = server
    await server.start()
    return host, server


def url(server: IscsiServer) -> str:
    host, port = server.addresses[0]
    return f"iscsi://{host}:{port}/{TGT}/0"


@pytest.mark.parametrize("fence", [True, False], ids=["fencing", "no-fencing"])
async def test_the_superseded_session_of_a_nexus_cannot_overwrite_the_newer_data(
    etcd: Etcd, tmp_path: Path, client_binary: Path, fence: bool
) -> None:
    c = Cluster(etcd, tmp_path)
    for i, zone in enumerate(("z1", "z2", "z3")):
        await c.add(f"chunk-{i}", zone, fence=fence)
    await c.wait_known()
    vol = VolumeRecord(id=VOL, name=VOL, size_bytes=4 * EXTENT, target=0, lun=0)
    await etcd.put(Keys.volume(VOL), vol.to_json())
    await etcd.put(Keys.lun(0, 0), LunRecord(volume_id=VOL, initiators=[HOST]).to_json())
    old_ap, new_ap = c.nodes["chunk-0"], c.nodes["chunk-1"]
    served = [await serve_iscsi(etcd, old_ap, 1), await serve_iscsi(etcd, new_ap, 2)]
    client = await Client.start(client_binary)
    key = Keys.nexus_epoch(Nexus(HOST, isid(PATH_A), TGT).initiator_port, TGT)
    try:
        assert await client(f"login old {PATH_A[0]} {PATH_A[1]} {url(served[0][1])}") == "OK"
        assert await client("write old 0 17") == "GOOD"
        assert await client(f"login other {PATH_B[0]} {PATH_B[1]} {url(served[0][1])}") == "OK"
        if fence:
            kv = await etcd.get(key)
            assert kv is not None and kv.value == old_ap.id.encode()
        # the initiator gives up on the old access point and logs in through the new one,
        # same initiator name and ISID (the old session's TCP connection is still open)
        assert await client(f"login new {PATH_A[0]} {PATH_A[1]} {url(served[1][1])}") == "OK"
        assert await client("write new 0 34") == "GOOD"
        if fence:
            kv = await etcd.get(key)
            assert kv is not None and kv.value == new_ap.id.encode()
        stale = await client("write old 0 51")
        assert await client("write other 8 68") == "GOOD"  # the other path is never fenced
        assert await client("read other 8") == "DATA 68 1"
        if fence:
            assert stale == "CHECK b 29 7"  # ABORTED COMMAND, I_T NEXUS LOSS OCCURRED
            assert await client("read new 0") == "DATA 34 1"
        else:
            assert stale == "GOOD"  # the superseded session overwrote acknowledged data
            assert await client("read new 0") == "DATA 51 1"
        for n in c.nodes.values():  # every replica agrees
            replica = await n.store.open(VOL, 0)
            assert await replica.read(0, 4096) == bytes([34 if fence else 51]) * 4096
        assert await client("logout old") == "OK"
        assert await client("logout new") == "OK"
        assert await client("logout other") == "OK"

        async def keys_gone() -> bool:
            kvs, _ = await etcd.get_prefix(Keys.NEXUS_EPOCHS)
            return not kvs

        # every session ended: every login is forgotten (the old one never removed the new)
        await async_wait_for(keys_gone, 10, "nexus epoch keys removed at logout")
    finally:
        await client.close()
        for host, server in served:
            await server.close()
            await host.stop()
        await c.close()
