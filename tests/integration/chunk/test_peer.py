"""The data protocol end to end: a real server process on loopback over a real ExtentStore."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import lunastor
from lunastor.chunk.store.checksums import checksums_of
from lunastor.chunk.wire.messages import Status
from lunastor.chunk.wire.peer import PeerAuthFailed, PeerClient, PeerUnavailable

REPO = Path(lunastor.__file__).parent.parent
SECRET = b"0123456789abcdef0123456789abcdef"
EXTENT = 1024 * 1024
BS = 4096


@dataclass
class ServerProc:
    proc: asyncio.subprocess.Process
    host: str
    port: int


async def start_server(tmp: Path, port: int = 0) -> ServerProc:
    (tmp / "secret").write_bytes(SECRET)
    (tmp / "data").mkdir(exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lunastor.chunk.wire.peer_serve",
        "--data-dir", str(tmp / "data"), "--listen", f"127.0.0.1:{port}",
        "--secret-file", str(tmp / "secret"), "--node", "srv", "--extent-size", str(EXTENT),
        stdout=asyncio.subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
    assert line.startswith(b"listening "), line
    host, _, p = line.split()[1].decode().rpartition(":")
    return ServerProc(proc, host, int(p))


async def stop(server: ServerProc, sig: int = signal.SIGTERM) -> None:
    if server.proc.returncode is None:
        server.proc.send_signal(sig)
        await asyncio.wait_for(server.proc.wait(), timeout=20)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ServerProc]:
    srv = await start_server(tmp_path)
    yield srv
    await stop(srv)


def pattern(seed: int, n: int) -> bytes:
    return (bytes([seed % 256, 255 - seed % 256, 7]) * (n // 3 + 1))[:n]


async def test_pipelined_writes_then_reads_round_trip(server: ServerProc) -> None:
    client = PeerClient(server.host, server.port, SECRET, "cli")
    assert (await client.ping()).ok
    assert (await client.create("vol", 0, 1)).ok
    # 40 writes in flight at once on one connection; applied in seq order
    writes = [
        (seq, (seq * 5000) % (EXTENT - 9000), pattern(seq, 1 + seq * 211 % 9000))
        for seq in range(1, 41)
    ]
    answers = await asyncio.gather(*(
        client.write("vol", 0, 1, seq, off, data, fua=seq == 40) for seq, off, data in writes
    ))  # fmt: skip
    assert [a.status for a in answers] == [Status.OK] * 40
    assert [a.fields["applied_seq"] for a in answers] == list(range(1, 41))
    model = bytearray(EXTENT)
    for _, off, data in writes:
        model[off : off + len(data)] = data
    got = await client.read("vol", 0, 1, 0, EXTENT)
    assert got.ok and got.payload == bytes(model)
    state = await client.get_state("vol", 0, with_checksums=True)
    assert state.ok and state.fields["applied_seq"] == 40 and state.fields["gen"] == 1
    assert state.payload == b"".join(
        checksums_of(model[b : b + BS]) if any(model[b : b + BS]) else bytes(8)
        for b in range(0, EXTENT, BS)
    )
    await client.close()


async def test_errors_come_back_as_statuses(server: ServerProc) -> None:
    client = PeerClient(server.host, server.port, SECRET, "cli")
    assert (await client.read("nope", 0, 1, 0, 10)).status is Status.NOT_FOUND
    assert (await client.create("v", 0, 5)).ok
    assert (await client.create("v", 0, 5)).status is Status.EXISTS
    stale = await client.write("v", 0, 4, 1, 0, b"x", fua=False)
    assert stale.status is Status.STALE_GENERATION and stale.fields["gen"] == 5
    assert (await client.write("v", 0, 5, 1, 0, b"x", fua=False)).ok
    repeat = await client.write("v", 0, 5, 1, 0, b"x", fua=False)
    assert repeat.status is Status.OUT_OF_ORDER and repeat.fields["expected"] == 2
    assert (await client.read("v", 0, 5, EXTENT - 1, 2)).status is Status.BAD_REQUEST
    bad_copy = await client.copy("v", 0, 5, 0, b"\1" * BS, b"\2" * 8)
    assert bad_copy.status is Status.CHECKSUM_MISMATCH and bad_copy.fields["blocks"] == [0]
    assert (await client.set_gen("v", 0, 6, state=1)).ok
    assert (await client.read("v", 0, 6, 0, 1)).status is Status.NOT_CURRENT
    assert (await client.set_gen("v", 0, 5)).status is Status.STALE_GENERATION
    assert (await client.delete("v", 0, 6)).ok
    assert (await client.delete("v", 0, 6)).status is Status.NOT_FOUND
    await client.close()


async def test_copy_converges_a_replica(server: ServerProc) -> None:
    client = PeerClient(server.host, server.port, SECRET, "cli")
    await client.create("src", 0, 1)
    await client.create("dst", 0, 1)
    await client.write("src", 0, 1, 1, 3 * BS + 5, pattern(1, 3 * BS), fua=False)
    src = await client.read("src", 0, 1, 3 * BS, 4 * BS, with_checksums=True)
    data, sums = src.payload[: 4 * BS], src.payload[4 * BS :]
    assert (await client.copy("dst", 0, 1, 3 * BS, data, sums)).ok
    a = await client.get_state("src", 0, with_checksums=True)
    b = await client.get_state("dst", 0, with_checksums=True)
    assert a.payload == b.payload and a.fields["mapped_blocks"] == 4
    await client.close()


async def test_wrong_secret_is_refused(server: ServerProc) -> None:
    client = PeerClient(server.host, server.port, b"not the secret", "cli")
    with pytest.raises(PeerAuthFailed):
        await client.ping()


async def test_client_reconnects_after_a_server_restart(tmp_path: Path) -> None:
    srv = await start_server(tmp_path)
    client = PeerClient(srv.host, srv.port, SECRET, "cli", connect_timeout=2)
    await client.create("v", 0, 1)
    assert (await client.write("v", 0, 1, 1, 0, b"before", fua=False)).ok
    await stop(srv, signal.SIGKILL)  # no clean close: the page cache keeps the write
    with pytest.raises(PeerUnavailable):
        await client.ping()
    srv = await start_server(tmp_path, srv.port)
    try:
        got = await client.read("v", 0, 1, 0, 6)  # a new connection, transparently
        assert got.ok and got.payload == b"before"
        assert (await client.write("v", 0, 1, 2, 6, b"after", fua=True)).ok
    finally:
        await client.close()
        await stop(srv)


async def test_deep_pipeline_and_abrupt_disconnects_in_process(tmp_path: Path) -> None:
    """More requests in flight than the server reads ahead (backpressure), then clients that
    vanish mid-frame: the server keeps serving everyone else."""
    from lunastor.chunk.replication.replicas import DataService
    from lunastor.chunk.store import ExtentStore
    from lunastor.chunk.wire.peer import PeerServer

    store = ExtentStore([tmp_path], EXTENT)
    server = PeerServer(DataService(store), SECRET, "srv")
    host, port = await server.start("127.0.0.1", 0)
    client = PeerClient(host, port, SECRET, "cli")
    await client.create("deep", 0, 1)
    n = 300
    answers = await asyncio.gather(*(
        client.write("deep", 0, 1, seq, (seq % 200) * BS, bytes([seq % 256]) * BS, fua=False)
        for seq in range(1, n + 1)
    ))  # fmt: skip
    assert [a.fields.get("applied_seq") for a in answers] == list(range(1, n + 1))
    # a raw client that sends half a frame and disappears
    _, writer = await asyncio.open_connection(host, port)
    writer.write(b"\0\0\0\x40" + b"\x80" * 10)
    await writer.drain()
    writer.close()
    # a raw client that sends garbage: the server answers nothing useful and closes
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\xff\xff\xff\xff")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # closed by the server
    writer.close()
    got = await client.read("deep", 0, 1, 199 * BS, BS)
    assert got.ok and got.payload == bytes([199]) * BS
    await client.close()
    await server.close()
    await store.close()
