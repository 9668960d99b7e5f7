"""The data protocol end to end: a real server process on loopback over a real ExtentStore."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import lunastor
from lunastor.chunk.replication.replicas import DataService
from lunastor.chunk.store import ExtentStore
from lunastor.chunk.store.checksums import checksums_of
from lunastor.chunk.wire.messages import Request, Response, Status, Write
from lunastor.chunk.wire.peer import PeerAuthFailed, PeerClient, PeerError, PeerUnavailable
from lunastor.chunk.wire.server import MAX_INFLIGHT, DataServer
from tests.support.procs import async_wait_for

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
    store = ExtentStore([tmp_path], EXTENT)
    server = DataServer(DataService(store), SECRET, "srv")
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


class _Held:
    """A service whose requests wait until released: counts how many run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.release = asyncio.Event()

    async def handle(self, req: Request) -> Response:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return Response(req.id, Status.OK)

    def handle_now(self, req: Request) -> Response | None:
        return None

    def handle_soon(self, req: Request, answer: Callable[[Response], None]) -> bool:
        return False

    def grant(self, peer: str) -> bool:
        return peer == "friend"


async def test_server_reads_no_further_than_its_inflight_limit() -> None:
    """The data port's one back-pressure rule (docs/data-protocol.md, "Transport"): at most
    MAX_INFLIGHT requests of a connection are started; the rest wait in TCP, and every one
    is answered once the first ones finish."""
    service = _Held()
    server = DataServer(service, SECRET, "srv")
    host, port = await server.start("127.0.0.1", 0)
    client = PeerClient(host, port, SECRET, "cli")
    try:
        calls = [asyncio.ensure_future(client.create("v", i, 1)) for i in range(5 * MAX_INFLIGHT)]

        async def full() -> bool:
            return service.running == MAX_INFLIGHT

        await async_wait_for(full, timeout=20, what="the first requests to start")
        await asyncio.sleep(0.3)  # reading stays paused: nothing more is started
        assert service.most == MAX_INFLIGHT
        service.release.set()
        answers = await asyncio.gather(*calls)
        assert all(a.ok for a in answers) and len(answers) == 5 * MAX_INFLIGHT
        assert service.most <= MAX_INFLIGHT
    finally:
        service.release.set()
        await client.close()
        await server.close()


async def test_ping_asks_the_service_for_a_read_lease_grant() -> None:
    service = _Held()
    service.release.set()
    server = DataServer(service, SECRET, "srv")
    host, port = await server.start("127.0.0.1", 0)
    friend = PeerClient(host, port, SECRET, "friend")
    other = PeerClient(host, port, SECRET, "other")
    try:
        assert (await friend.ping()).ok
        assert (await other.ping()).status is Status.UNAVAILABLE
    finally:
        await friend.close()
        await other.close()
        await server.close()


class _Counting(DataService):
    """The real extent-store service, counting the requests that needed a Task."""

    def __init__(self, store: ExtentStore) -> None:
        super().__init__(store)
        self.waited: list[str] = []

    async def handle(self, req: Request) -> Response:
        self.waited.append(str(req.OP))
        return await super().handle(req)


async def test_forwarded_writes_are_applied_in_the_receive_callback(tmp_path: Path) -> None:
    """A secondary applies a primary's pipelined writes as they arrive, without a Task each
    (docs/datapath.md); a FUA write goes through a Task, and the writes behind it on the
    connection wait for it rather than overtake it."""
    store = ExtentStore([tmp_path], EXTENT)
    service = _Counting(store)
    server = DataServer(service, SECRET, "srv")
    host, port = await server.start("127.0.0.1", 0)
    client = PeerClient(host, port, SECRET, "cli")
    try:
        assert (await client.create("v", 0, 1)).ok
        assert (await client.write("v", 0, 1, 1, 0, b"a" * BS, fua=False)).ok  # DIRTY mark
        service.waited.clear()
        n = 60
        answers = await asyncio.gather(*(
            client.write("v", 0, 1, seq, (seq % 200) * BS, bytes([seq]) * BS, fua=seq == n)
            for seq in range(2, n + 2)
        ))  # fmt: skip
        # all applied, none out of order ("applied" answers the replica's seq at answer
        # time: the FUA write's comes after its flush, when later writes were applied too)
        assert all(a.ok and a.fields["applied_seq"] >= s for s, a in enumerate(answers, 2))
        # only the FUA write (and the one behind it, when it came before the flush ended)
        assert service.waited in (["write"], ["write", "write"])
        state = await client.get_state("v", 0)
        assert state.fields["applied_seq"] == n + 1
        got = await client.read("v", 0, 1, (n + 1) % 200 * BS, BS)
        assert got.payload == bytes([n + 1]) * BS
    finally:
        await client.close()
        await server.close()
        await store.close()


async def test_one_deadline_timer_fails_every_unanswered_request() -> None:
    service = _Held()
    server = DataServer(service, SECRET, "srv")
    host, port = await server.start("127.0.0.1", 0)
    client = PeerClient(host, port, SECRET, "cli", request_timeout=0.5)
    try:
        assert (await client.ping()).status is Status.UNAVAILABLE  # connected ("cli": no grant)
        loop = asyncio.get_running_loop()
        start = loop.time()
        first = [asyncio.ensure_future(client.create("v", i, 1)) for i in range(10)]
        await asyncio.sleep(0.3)
        later = asyncio.ensure_future(client.create("v", 99, 1))
        done = await asyncio.gather(*first, return_exceptions=True)
        assert all(isinstance(r, PeerUnavailable) for r in done)
        assert 0.45 <= loop.time() - start < 5
        assert not later.done()  # its own deadline is later
        assert isinstance((await asyncio.gather(later, return_exceptions=True))[0], PeerUnavailable)
        assert loop.time() - start >= 0.75
    finally:
        service.release.set()
        await client.close()
        await server.close()


class _HoldingFrom(DataService):
    """The real extent-store service, except that it answers no write from seq `hold` on:
    a member that stops acknowledging."""

    def __init__(self, store: ExtentStore, hold: int) -> None:
        super().__init__(store)
        self.hold = hold
        self.release = asyncio.Event()

    def handle_now(self, req: Request) -> Response | None:
        if getattr(req, "seq", 0) >= self.hold:
            return None
        return super().handle_now(req)

    async def handle(self, req: Request) -> Response:
        if getattr(req, "seq", 0) >= self.hold:
            await self.release.wait()
        return await super().handle(req)


async def test_forwards_are_settled_by_cumulative_acks(tmp_path: Path) -> None:
    """A primary's pipelined forwards (answers to callbacks, as `Settling` gets them) are
    answered by a few acks "applied through seq N", each answering every forward of the
    extent up to N exactly once; an error in between is answered on its own, and the
    forwards after it are acked again; a FUA forward (a Task at the secondary) is not
    overtaken. Then the member stops answering: the connection's deadline fails what is
    unanswered, as it fails any request (docs/data-protocol.md, "Cumulative acks")."""
    store = ExtentStore([tmp_path], EXTENT)
    service = _HoldingFrom(store, hold=200)
    server = DataServer(service, SECRET, "srv")
    host, port = await server.start("127.0.0.1", 0)
    client = PeerClient(host, port, SECRET, "cli", request_timeout=1.0)
    answers: dict[int, list[Response | PeerError]] = {}

    def forward(seq: int, gen: int = 1, fua: bool = False) -> None:
        answers[seq] = got = []
        data = bytes([seq % 256]) * BS
        build = lambda i: Write(i, "v", 0, gen, seq, (seq % 200) * BS, fua, data)  # noqa: E731
        assert client.send_now_to(build, got.append)

    try:
        assert (await client.create("v", 0, 1)).ok
        assert (await client.write("v", 0, 1, 1, 0, b"a" * BS, fua=False)).ok  # DIRTY mark
        proto = client._proto
        assert proto is not None and proto.conn.version == 3
        acks = 0
        settle = proto.conn._settle

        def counting(values: tuple[int, ...], responses: list[Response]) -> None:
            nonlocal acks
            acks += 1
            settle(values, responses)

        proto.conn._settle = counting  # type: ignore[method-assign]
        for seq in range(2, 60):  # one burst, a FUA write in it
            forward(seq, fua=seq == 30)
        await asyncio.sleep(0)  # the burst leaves; the next one in a later loop iteration
        for seq in range(60, 100):
            forward(seq)

        async def answered() -> bool:
            return all(answers.values())

        await async_wait_for(answered, timeout=20, what="every forward answered")
        assert all(len(a) == 1 and isinstance(a[0], Response) and a[0].ok for a in answers.values())
        assert 2 <= acks < 40, acks  # a few acks, not one answer per write
        # an error between successes: a stale generation, answered on its own
        acks = 0
        forward(100)
        forward(101, gen=0)
        await async_wait_for(answered, timeout=20, what="the error answered")
        [refused] = answers.pop(101)
        assert isinstance(refused, Response) and refused.status is Status.STALE_GENERATION
        [applied] = answers[100]
        assert isinstance(applied, Response) and applied.ok
        forward(101)  # its retry (a seq sent before: a msgpack frame, answered on its own)
        for seq in range(102, 120):
            forward(seq)
        await async_wait_for(answered, timeout=20, what="the forwards after the error")
        assert all(len(a) == 1 and isinstance(a[0], Response) and a[0].ok for a in answers.values())
        assert 1 <= acks < 18
        state = await client.get_state("v", 0)
        assert state.fields["applied_seq"] == 119
        # the member stops answering: every forward it holds fails at the deadline
        loop = asyncio.get_running_loop()
        start = loop.time()
        service.hold = 120
        for seq in range(120, 130):
            forward(seq)
        await async_wait_for(answered, timeout=20, what="the deadline")
        assert 0.9 <= loop.time() - start < 10
        for seq in range(120, 130):
            [failed] = answers[seq]
            assert isinstance(failed, PeerUnavailable)
    finally:
        service.release.set()
        await client.close()
        await server.close()
        await store.close()


async def test_a_members_flush_is_answered_from_its_round_without_a_task(tmp_path: Path) -> None:
    """A member's flush starts its flush round in the receive callback and is answered from
    the round's completion (docs/datapath.md, "Write + flush at QD1"): no Task per Flush.
    Concurrent flushes share rounds (group commit); every one is answered, and the replica's
    `durable_seq` reaches what was applied."""
    store = ExtentStore([tmp_path], EXTENT)
    service = _Counting(store)
    server = DataServer(service, SECRET, "srv")
    host, port = await server.start("127.0.0.1", 0)
    client = PeerClient(host, port, SECRET, "cli")
    try:
        assert (await client.create("v", 0, 1)).ok
        for seq in range(1, 4):
            assert (await client.write("v", 0, 1, seq, seq * BS, b"f" * BS, fua=False)).ok
        service.waited.clear()
        flushes = await asyncio.gather(*(client.flush("v", 0, 1) for _ in range(8)))
        assert all(f.ok for f in flushes)
        assert (await client.flush("v", 0, 1)).ok
        assert service.waited == []  # none needed a Task
        state = await client.get_state("v", 0)
        assert state.fields["durable_seq"] == state.fields["applied_seq"] == 3
        # a replica that is not open: the full path (a Task) tries to open it
        service.waited.clear()
        assert (await client.flush("v", 9, 1)).status is Status.NOT_FOUND
        assert service.waited == ["flush"]
    finally:
        await client.close()
        await server.close()
        await store.close()
