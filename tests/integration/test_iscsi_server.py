"""The asyncio server over real sockets, with a small initiator built from our own codec.

What libiscsi cannot be made to do on demand: digests on both directions, session
reinstatement with the same ISID while the old connection is alive, target NOP-In pings to
a silent initiator, a LUN reset reaching another session's running command.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from lunastor.chunk.access.completion import Completion
from lunastor.chunk.access.iscsi_server import IscsiServer, ServerConfig
from lunastor.iscsi import pdu as p
from lunastor.iscsi.chap import ChapCredentials
from lunastor.iscsi.memdev import MemoryBlockDevice
from lunastor.iscsi.scsi.target import LogicalUnit, ScsiTarget
from lunastor.iscsi.scsi.types import Nexus
from lunastor.iscsi.session import TargetInfo
from lunastor.iscsi.text import encode_text, parse_text
from tests.support.procs import async_wait_for

IQN = "iqn.2024-01.io.lunastor.test:mem"
HOST = "iqn.2024-01.io.lunastor.test:host"


@dataclass
class MemHost:
    """A `TargetHost` over one memory LUN that records the nexuses the server reports lost."""

    target: ScsiTarget
    lost: list[Nexus] = field(default_factory=list)

    def target_exists(self, target: str) -> bool:
        return target == IQN

    def may_login(self, initiator: str, target: str) -> bool:
        return target == IQN

    def chap(self, target: str | None) -> ChapCredentials | None:
        return None

    def discoverable(self, initiator: str, portal: str) -> Sequence[TargetInfo]:
        return [TargetInfo(IQN, (f"{portal},1",))]

    def redirect(self, initiator: str, target: str) -> str | None:
        return None

    def scsi_target(self, name: str) -> ScsiTarget | None:
        return self.target if name == IQN else None


class Initiator:
    """Just enough of an initiator: login, commands, whatever the target sends back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer
        self.pdus = p.PduReader(sender="target", max_recv_data_segment_length=1 << 20)
        self.cmdsn = 1
        self.statsn = 0
        self.itt = 0
        self.digests = (False, False)

    @classmethod
    async def connect(cls, port: int) -> Initiator:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, pdu: p.Pdu) -> None:
        self.w.writelines(p.encode_pdu(pdu, *self.digests))

    async def recv(self, timeout: float = 5.0) -> p.Pdu | None:
        """The next PDU, or None at EOF."""
        while True:
            pdu = self.pdus.next_pdu()
            if pdu is not None:
                return pdu
            data = await asyncio.wait_for(self.r.read(65536), timeout)
            if not data:
                return None
            self.pdus.feed(data)

    async def login(self, isid: int = 0x400001, digest: str = "None") -> p.LoginResponse:
        keys = [
            ("InitiatorName", HOST),
            ("TargetName", IQN),
            ("SessionType", "Normal"),
            ("HeaderDigest", digest),
            ("DataDigest", digest),
            ("MaxRecvDataSegmentLength", "65536"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "Yes"),
        ]
        self.send(
            p.LoginRequest(
                transit=True,
                csg=1,
                nsg=3,
                isid=isid,
                itt=0,
                cmdsn=self.cmdsn,
                data=encode_text(keys),
            )
        )
        resp = await self.recv()
        assert isinstance(resp, p.LoginResponse), resp
        assert resp.status_class == 0, (resp.status_class, resp.status_detail)
        on = digest == "CRC32C"
        answer = dict(parse_text(resp.data))
        assert answer["HeaderDigest"] == digest
        self.digests = (on, on)
        self.pdus.header_digest = self.pdus.data_digest = on
        self.statsn = resp.statsn + 1
        return resp

    def command(self, cdb: bytes, *, read: int = 0, write: int = 0, imm: bytes = b"") -> int:
        """Send a command; `write` is its EDTL for writes, `imm` its immediate data."""
        self.itt += 1
        self.send(
            p.ScsiCommand(
                itt=self.itt,
                cmdsn=self.cmdsn,
                expstatsn=self.statsn,
                cdb=cdb.ljust(16, b"\0"),
                read=bool(read),
                write=bool(write),
                expected_data_transfer_length=read or write,
                data=imm,
            )
        )
        self.cmdsn += 1
        return self.itt

    async def result(self, itt: int) -> tuple[int, bytes]:
        """Status and data-in of `itt`, answering R2Ts from `self.pending_write`."""
        data = bytearray()
        while True:
            pdu = await self.recv()
            assert pdu is not None, "connection closed"
            if isinstance(pdu, p.DataIn) and pdu.itt == itt:
                data[pdu.buffer_offset : pdu.buffer_offset + len(pdu.data)] = pdu.data
                if pdu.status_present:
                    return pdu.status, bytes(data)
            elif isinstance(pdu, p.ScsiResponse) and pdu.itt == itt:
                return pdu.status, bytes(data)
            elif isinstance(pdu, p.DataIn | p.ScsiResponse):
                raise AssertionError(f"answer for another task: {pdu!r}")
            elif isinstance(pdu, p.R2T):
                chunk = self.pending_write[
                    pdu.buffer_offset : pdu.buffer_offset + pdu.desired_data_transfer_length
                ]
                self.send(
                    p.DataOut(
                        itt=pdu.itt,
                        ttt=pdu.ttt,
                        buffer_offset=pdu.buffer_offset,
                        data=chunk,
                        final=True,
                    )
                )

    pending_write: bytes = b""

    async def ready(self) -> None:
        """Clear the power-on unit attention."""
        status, _ = await self.result(self.command(b"\x00"))
        if status:
            status, _ = await self.result(self.command(b"\x00"))
        assert status == 0

    def close(self) -> None:
        self.w.close()


def read10(lba: int, blocks: int) -> bytes:
    return bytes([0x28, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def write10(lba: int, blocks: int) -> bytes:
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


class SlowDevice(MemoryBlockDevice):
    """A memory device whose reads and writes wait on the event loop, like a replicated
    volume does: the server's path for commands that do not finish in their first step.
    `held`: writes wait on a `Completion` each, appended there, as a replicated write at
    its primary waits for its forwards; `after`: then sleep that long too (a plain wait)."""

    delay = 0.0
    held: list[Completion] | None = None
    after = 0.0
    cancelled = 0  # held writes that saw their cancellation

    @property
    def inline_ok(self) -> bool:  # type: ignore[override]
        # with a delay or held writes, every command takes the awaitable path
        return not self.delay and self.held is None

    async def read(self, lba: int, blocks: int) -> bytes | bytearray | memoryview:
        if self.delay:
            await asyncio.sleep(self.delay)
        return await super().read(lba, blocks)

    async def write(
        self,
        lba: int,
        data: bytes | bytearray | memoryview,
        fua: bool,
        nexus: Nexus | None = None,
    ) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.held is not None:
            done = Completion()
            self.held.append(done)
            data = bytes(data)  # (a view of the receive buffer)
            try:
                await done
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            if self.after:
                await asyncio.sleep(self.after)
        await super().write(lba, data, fua, nexus)


@pytest.fixture
async def server() -> AsyncIterator[tuple[IscsiServer, MemHost]]:
    lu = LogicalUnit(SlowDevice(1 << 16), naa_id=0x6 << 124 | 1, serial="mem1")
    host = MemHost(ScsiTarget(IQN, {0: lu}))
    original = host.target.nexus_lost

    def nexus_lost(nexus: Nexus) -> None:
        host.lost.append(nexus)
        original(nexus)

    host.target.nexus_lost = nexus_lost  # type: ignore[method-assign]
    srv = IscsiServer(
        host,
        ServerConfig(listen=[("127.0.0.1", 0)], ping_interval=1.0, ping_timeout=1.5),
    )
    await srv.start()
    yield srv, host
    await srv.close()


async def test_digests_write_and_read_back(server: tuple[IscsiServer, MemHost]) -> None:
    srv, _ = server
    ini = await Initiator.connect(srv.addresses[0][1])
    await ini.login(digest="CRC32C")
    await ini.ready()
    payload = os.urandom(128 * 1024)
    ini.pending_write = payload  # 128 KiB: immediate part, then R2Ts
    status, _ = await ini.result(
        ini.command(write10(8, 256), write=len(payload), imm=payload[:8192])
    )
    assert status == 0
    status, data = await ini.result(ini.command(read10(8, 256), read=len(payload)))
    assert status == 0 and data == payload
    ini.close()


async def test_tracing_logs_every_pdu_and_serves_the_same(
    server: tuple[IscsiServer, MemHost], caplog: pytest.LogCaptureFixture
) -> None:
    """At DEBUG the server logs each PDU both ways (the fast path is off): the answers must
    be the same, and the outgoing ones are read from the connection without taking them."""
    srv, _ = server
    srv.trace = True
    caplog.set_level(logging.DEBUG, logger="lunastor.chunk.access.iscsi_server")
    ini = await Initiator.connect(srv.addresses[0][1])
    await ini.login()
    await ini.ready()
    payload = os.urandom(8192)
    ini.pending_write = payload
    status, _ = await ini.result(ini.command(write10(8, 16), write=len(payload), imm=payload))
    assert status == 0
    status, data = await ini.result(ini.command(read10(8, 16), read=len(payload)))
    assert status == 0 and data == payload
    ini.close()
    sent = [r.getMessage() for r in caplog.records if r.getMessage().startswith("-> ")]
    assert any("DataIn" in m for m in sent) and any("ScsiResponse" in m for m in sent), sent


async def test_receive_buffer_is_reused_and_data_stays_right(
    server: tuple[IscsiServer, MemHost],
) -> None:
    """The socket is read into the connection's own buffer (BufferedProtocol); it is filled
    from its start again once nothing refers to it, without a byte of data going wrong."""
    srv, _ = server
    ini = await Initiator.connect(srv.addresses[0][1])
    await ini.login()
    await ini.ready()
    (proto,) = srv.connections
    buffers: list[bytearray] = []  # held, so that a new buffer cannot reuse an old id
    for i in range(48):
        payload = os.urandom(64 * 1024)
        ini.pending_write = payload  # immediate part, then Data-Out answering R2Ts
        status, _ = await ini.result(
            ini.command(write10(i * 128, 128), write=len(payload), imm=payload[:8192])
        )
        assert status == 0
        status, data = await ini.result(ini.command(read10(i * 128, 128), read=len(payload)))
        assert status == 0 and data == payload
        if not any(b is proto._rbuf for b in buffers):
            buffers.append(proto._rbuf)
    # 48 x 64 KiB went through a 1 MiB buffer: refilled from its start, not replaced
    assert len(buffers) <= 2
    ini.close()


def test_receive_buffer_under_uvloop() -> None:
    """The daemons run uvloop, which holds the view `get_buffer` returned until
    `buffer_updated` has returned: the buffer is still reused, the fast path still answers,
    and R2T write buffers come from the pool."""

    async def main() -> tuple[int, int, int]:
        lu = LogicalUnit(MemoryBlockDevice(1 << 16), naa_id=0x6 << 124 | 1, serial="mem1")
        srv = IscsiServer(
            MemHost(ScsiTarget(IQN, {0: lu})), ServerConfig(listen=[("127.0.0.1", 0)])
        )
        await srv.start()
        try:
            ini = await Initiator.connect(srv.addresses[0][1])
            await ini.login()
            await ini.ready()
            (proto,) = srv.connections
            seen: list[bytearray] = []
            for i in range(48):
                payload = os.urandom(64 * 1024)
                ini.pending_write = payload
                status, _ = await ini.result(
                    ini.command(write10(i * 128, 128), write=len(payload), imm=payload[:8192])
                )
                assert status == 0
                status, data = await ini.result(
                    ini.command(read10(i * 128, 128), read=len(payload))
                )
                assert status == 0 and data == payload
                if not any(b is proto._rbuf for b in seen):
                    seen.append(proto._rbuf)
            ini.close()
            return len(seen), proto.conn.fast_commands, proto.conn.pool.allocated
        finally:
            await srv.close()

    buffers, fast, allocated = uvloop.run(main())
    assert buffers <= 2
    assert fast == 48  # every 64 KiB read (the writes need R2Ts: the full path)
    assert allocated <= 2


async def test_reinstatement_closes_the_old_connection(
    server: tuple[IscsiServer, MemHost],
) -> None:
    srv, host = server
    port = srv.addresses[0][1]
    old = await Initiator.connect(port)
    first = await old.login(isid=0x400077)
    await old.ready()
    new = await Initiator.connect(port)
    second = await new.login(isid=0x400077)
    assert second.tsih != first.tsih
    assert await old.recv() is None  # the old connection was dropped
    assert [n.isid for n in host.lost] == [0x400077]
    await new.ready()  # the new session works (and got its own unit attention)
    assert len(srv.registry) == 1
    new.close()
    old.close()


async def test_silent_initiator_is_pinged_then_dropped(
    server: tuple[IscsiServer, MemHost],
) -> None:
    srv, _ = server
    ini = await Initiator.connect(srv.addresses[0][1])
    await ini.login()
    ping = await ini.recv(timeout=5)
    assert isinstance(ping, p.NopIn) and ping.ttt != p.RESERVED_TAG
    assert await ini.recv(timeout=5) is None  # never answered: closed
    ini.close()


async def test_answered_pings_keep_the_session(server: tuple[IscsiServer, MemHost]) -> None:
    srv, _ = server
    ini = await Initiator.connect(srv.addresses[0][1])
    await ini.login()
    for _ in range(3):
        ping = await ini.recv(timeout=5)
        assert isinstance(ping, p.NopIn)
        ini.send(p.NopOut(itt=p.RESERVED_TAG, ttt=ping.ttt, immediate=True, cmdsn=ini.cmdsn))
    await ini.ready()
    ini.close()


def _device(host: MemHost) -> SlowDevice:
    dev = host.target.luns[0].device
    assert isinstance(dev, SlowDevice)
    return dev


async def test_commands_that_wait_complete(server: tuple[IscsiServer, MemHost]) -> None:
    srv, host = server
    _device(host).delay = 0.01
    ini = await Initiator.connect(srv.addresses[0][1])
    await ini.login()
    await ini.ready()
    payload = os.urandom(4096)
    status, _ = await ini.result(ini.command(write10(0, 8), write=4096, imm=payload))
    assert status == 0
    itts = [ini.command(read10(0, 8), read=4096) for _ in range(8)]
    for itt in itts:
        assert await ini.result(itt) == (0, payload)
    ini.close()


async def test_abort_task_cancels_a_waiting_command(server: tuple[IscsiServer, MemHost]) -> None:
    srv, host = server
    ini = await Initiator.connect(srv.addresses[0][1])
    await ini.login()
    await ini.ready()
    _device(host).delay = 30.0  # never finishes on its own within the test
    slow = ini.command(read10(0, 8), read=4096)
    ini.send(
        p.TaskManagementRequest(
            function=1,
            itt=900,
            referenced_task_tag=slow,
            ref_cmdsn=ini.cmdsn - 1,
            cmdsn=ini.cmdsn,
            immediate=True,
        )
    )
    resp = await ini.recv()
    assert isinstance(resp, p.TaskManagementResponse) and resp.itt == 900
    assert resp.response == 0
    _device(host).delay = 0.0
    status, _ = await ini.result(ini.command(b"\x00"))  # the session goes on; no late answer
    assert status == 0
    ini.close()


async def _until(condition: Callable[[], bool], what: str) -> None:
    async def check() -> bool:
        return condition()

    await async_wait_for(check, 5, what)


def _counting_tasks(made: list[str]) -> None:
    """Record the coroutine name of every Task the running loop makes from now on."""

    def factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kw: Any
    ) -> asyncio.Task[Any]:
        made.append(getattr(coro, "__qualname__", ""))
        return asyncio.Task(coro, loop=loop, **kw)

    asyncio.get_running_loop().set_task_factory(factory)  # type: ignore[arg-type]


@pytest.mark.parametrize("after", [0.0, 0.01])
async def test_commands_waiting_on_a_completion_run_in_no_task(
    server: tuple[IscsiServer, MemHost], after: float
) -> None:
    # A replicated write at its primary waits on a Completion (its forwards' answers): the
    # server resumes it from the future's callback, no Task per command (issue 12). One
    # that then waits on anything else continues in a Task, where anything may be awaited.
    srv, host = server
    dev = _device(host)
    dev.held, dev.after = [], after
    ini = await Initiator.connect(srv.addresses[0][1])
    await ini.login()
    await ini.ready()
    payloads = [os.urandom(4096) for _ in range(8)]
    made: list[str] = []
    _counting_tasks(made)
    try:
        itts = [ini.command(write10(8 * k, 8), write=4096, imm=payloads[k]) for k in range(8)]
        await _until(lambda: len(dev.held or ()) == 8, "every write to wait")
        for done in dev.held:
            done.set_result(None)
        for itt in itts:
            assert await ini.result(itt) == (0, b"")
    finally:
        asyncio.get_running_loop().set_task_factory(None)
    commands = [n for n in made if n.startswith("IscsiConnectionProtocol.")]
    assert commands == (["IscsiConnectionProtocol._resume"] * 8 if after else []), made
    dev.held = None
    for k in range(8):
        assert await ini.result(ini.command(read10(8 * k, 8), read=4096)) == (0, payloads[k])
    ini.close()


async def test_abort_task_ends_a_command_waiting_on_a_completion(
    server: tuple[IscsiServer, MemHost],
) -> None:
    srv, host = server
    dev = _device(host)
    ini = await Initiator.connect(srv.addresses[0][1])
    await ini.login()
    await ini.ready()
    dev.held = []
    held = ini.command(write10(0, 8), write=4096, imm=os.urandom(4096))
    await _until(lambda: len(dev.held or ()) == 1, "the write to wait")
    ini.send(
        p.TaskManagementRequest(
            function=1,
            itt=900,
            referenced_task_tag=held,
            ref_cmdsn=ini.cmdsn - 1,
            cmdsn=ini.cmdsn,
            immediate=True,
        )
    )
    resp = await ini.recv()
    assert isinstance(resp, p.TaskManagementResponse) and resp.itt == 900
    assert resp.response == 0
    assert dev.cancelled == 1 and dev.held[0].cancelled()  # ended where it waited
    dev.held = None
    status, _ = await ini.result(ini.command(b"\x00"))  # the session goes on; no late answer
    assert status == 0
    # ... and a connection lost ends its waiting commands the same way
    dev.held = []
    ini.command(write10(0, 8), write=4096, imm=os.urandom(4096))
    await _until(lambda: len(dev.held or ()) == 1, "the write to wait")
    ini.close()
    await _until(lambda: dev.cancelled == 2, "the write to be cancelled")


async def test_lun_reset_aborts_other_sessions_tasks(
    server: tuple[IscsiServer, MemHost],
) -> None:
    srv, host = server
    port = srv.addresses[0][1]
    a, b = await Initiator.connect(port), await Initiator.connect(port)
    await a.login(isid=0x400010)
    await b.login(isid=0x400011)
    await a.ready()
    await b.ready()
    _device(host).delay = 30.0
    a.command(read10(0, 8), read=4096)  # stuck in the device
    await asyncio.sleep(0.1)
    b.send(p.TaskManagementRequest(function=5, itt=77, cmdsn=b.cmdsn, immediate=True))
    resp = await b.recv()
    assert isinstance(resp, p.TaskManagementResponse) and resp.response == 0
    _device(host).delay = 0.0
    # a's read was aborted (no response); a's next command sees the reset's unit attention
    status, _ = await a.result(a.command(b"\x00"))
    assert status == 2
    a.close()
    b.close()


async def test_initiator_that_does_not_read_stops_being_read(
    server: tuple[IscsiServer, MemHost],
) -> None:
    srv, _ = server
    ini = await Initiator.connect(srv.addresses[0][1])
    await ini.login()
    await ini.ready()
    (proto,) = srv.connections
    assert proto.transport is not None and proto.transport.is_reading()
    for _ in range(100):  # 100 x 256 KiB of Data-In that we never read
        ini.command(read10(0, 512), read=512 * 512)
    await ini.w.drain()

    async def paused() -> bool:
        return not proto.transport.is_reading()  # type: ignore[union-attr]

    await async_wait_for(paused, 10, "the server to pause reading")
    ini.close()


@pytest.mark.parametrize("seed", range(5))
async def test_garbage_after_login_never_hurts_the_server(
    server: tuple[IscsiServer, MemHost], seed: int
) -> None:
    srv, _ = server
    rng = random.Random(seed)
    ini = await Initiator.connect(srv.addresses[0][1])
    await ini.login()
    ini.w.write(rng.randbytes(4096))
    seen: list[p.Pdu] = []
    while (pdu := await ini.recv(timeout=5)) is not None:
        seen.append(pdu)  # Rejects (and answers to PDUs that happened to decode), then EOF
        if len(seen) > 200:
            break
    ini.close()
    again = await Initiator.connect(srv.addresses[0][1])
    await again.login(isid=0x400100 + seed)
    await again.ready()
    again.close()


async def test_server_asks_initiators_to_log_out(server: tuple[IscsiServer, MemHost]) -> None:
    srv, _ = server
    ini = await Initiator.connect(srv.addresses[0][1])
    await ini.login()
    await ini.ready()
    srv.request_logout(IQN, within=3)
    msg = await ini.recv()
    assert isinstance(msg, p.AsyncMessage) and msg.async_event == p.AsyncEvent.LOGOUT_REQUESTED
    ini.send(p.LogoutRequest(itt=99, cmdsn=ini.cmdsn, immediate=True))
    resp = await ini.recv()
    assert isinstance(resp, p.LogoutResponse) and resp.response == 0
    assert await ini.recv() is None
    ini.close()
