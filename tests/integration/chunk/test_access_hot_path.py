"""The access point's write hot path (issue 12, docs/datapath.md "The hot path, step by
step"): an iSCSI initiator on real sockets, the chunk server's iSCSI server over a
`ReplicatedVolume`, three data nodes of a real etcd; the access point is the extent's
primary. A 4 KiB write there is applied, forwarded and answered without one asyncio Task."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import pytest

from lunastor.chunk.access.iscsi_server import IscsiServer, ServerConfig
from lunastor.chunk.access.volume import SEQUENCED_LOCAL, VIEW_WRITES_FROM
from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.iscsi import pdu as p
from lunastor.iscsi.scsi.target import LogicalUnit, ScsiTarget
from tests.integration.chunk.test_replication import EXTENT, Cluster, Node, _identical, blocks
from tests.integration.test_iscsi_server import IQN, Initiator, MemHost, read10, write10
from tests.support.etcd import EtcdServer
from tests.support.procs import async_wait_for

DEPTH = 32


@pytest.fixture(params=[False, True], ids=["unfenced", "fenced"])
async def cluster(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Cluster]:
    config = EtcdConfig(endpoints=[etcd_server.endpoint], namespace=etcd_prefix, timeout=5)
    async with await Etcd.connect(config) as etcd:
        c = Cluster(etcd, tmp_path)
        for i, zone in enumerate(("z1", "z2", "z3")):
            await c.add(f"chunk-{i}", zone, fence=request.param)
        await c.wait_known()
        try:
            yield c
        finally:
            await c.close()


async def answers(ini: Initiator, itts: list[int]) -> dict[int, int]:
    """The status of each of `itts`, in whatever order they come."""
    out: dict[int, int] = {}
    while len(out) < len(itts):
        pdu = await ini.recv()
        assert isinstance(pdu, p.ScsiResponse), pdu
        out[pdu.itt] = pdu.status
    return out


@contextlib.asynccontextmanager
async def at_the_primary(
    cluster: Cluster, n: int
) -> AsyncIterator[tuple[Node, IscsiServer, Initiator]]:
    """An iSCSI server over the volume at its extent's primary, an initiator logged in to
    it, the unit attention cleared and (fenced) the login's nexus epoch stored."""
    first = cluster.volume("chunk-0", size=EXTENT)
    await first.write(0, blocks(1, 8), fua=False)  # places the extent: who is its primary?
    rec = cluster.nodes["chunk-0"].emap.get("vol-t", 0)
    assert rec is not None
    here = cluster.nodes[rec.primary]
    volume = cluster.volume(here.id, size=EXTENT)
    lu = LogicalUnit(volume, naa_id=0x6 << 124 | n, serial=f"hot{n}")
    server = IscsiServer(
        MemHost(ScsiTarget(IQN, {0: lu})),
        ServerConfig(listen=[("127.0.0.1", 0)]),
        observer=here.epochs,  # fenced: every write carries the session's nexus epoch
    )
    await server.start()
    ini = await Initiator.connect(server.addresses[0][1])
    try:
        await ini.login()
        await ini.ready()
        await async_wait_for(_epochs_stored(here.epochs), 10, "the login's epoch stored")
        yield here, server, ini
    finally:
        ini.close()
        await server.close()


async def test_a_write_at_its_primary_runs_no_task_at_the_access_point(cluster: Cluster) -> None:
    async with at_the_primary(cluster, 7) as (_, _, ini):
        assert await ini.result(ini.command(write10(0, 8), write=4096, imm=blocks(2, 8))) == (
            0,
            b"",
        )
        local = SEQUENCED_LOCAL._value.get()
        payloads = [os.urandom(4096) for _ in range(DEPTH)]
        made: list[str] = []
        loop = asyncio.get_running_loop()

        def factory(
            loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kw: Any
        ) -> asyncio.Task[Any]:
            made.append(getattr(coro, "__qualname__", ""))
            return asyncio.Task(coro, loop=loop, **kw)

        loop.set_task_factory(factory)  # type: ignore[arg-type]
        try:
            itts = [
                ini.command(write10(8 * (k + 1), 8), write=4096, imm=payloads[k])
                for k in range(DEPTH)  # QD32, pipelined: one burst
            ]
            assert set((await answers(ini, itts)).values()) == {0}
        finally:
            loop.set_task_factory(None)
        # (the lease renewals' pings and etcd's watches run in tasks of their own meanwhile)
        command = ("IscsiConnectionProtocol.", "ReplicatedVolume.", "AccessPath.", "DataNode.")
        per_write = [n for n in made if n.startswith(command) and n != "DataNode._renew"]
        assert not per_write, per_write
        assert SEQUENCED_LOCAL._value.get() - local == DEPTH  # all sequenced here
        for k in range(DEPTH):
            got = await ini.result(ini.command(read10(8 * (k + 1), 8), read=4096))
            assert got == (0, payloads[k])
    await async_wait_for(
        lambda: _identical(cluster, "vol-t", 0), 10, "the replicas to settle identical"
    )


def _epochs_stored(epochs: Any) -> Any:
    async def stored() -> bool:
        return epochs is None or all(t.done() for t in epochs._logins.values())

    return stored


def sync_cache10() -> bytes:
    return bytes([0x35]) + bytes(9)  # the whole LUN


async def test_a_flush_at_its_primary_runs_no_task_at_the_access_point(cluster: Cluster) -> None:
    # A database commit: a QD1 write, then SYNCHRONIZE CACHE. The flush of the one extent
    # written, led by the access point's own process, goes to `DataNode.primary_flush`
    # from the command itself (docs/datapath.md, "QD1 write+flush, step by step"), and
    # every member's copy is durable when it is answered.
    made: list[str] = []
    loop = asyncio.get_running_loop()

    def factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kw: Any
    ) -> asyncio.Task[Any]:
        made.append(getattr(coro, "__qualname__", ""))
        return asyncio.Task(coro, loop=loop, **kw)

    async with at_the_primary(cluster, 8) as (_, _, ini):
        assert await ini.result(ini.command(sync_cache10())) == (0, b"")  # warm-up
        loop.set_task_factory(factory)  # type: ignore[arg-type]
        try:
            for k in range(8):
                payload = os.urandom(4096)
                itt = ini.command(write10(8 * k, 8), write=4096, imm=payload)
                assert await ini.result(itt) == (0, b"")
                assert await ini.result(ini.command(sync_cache10())) == (0, b"")
                for node in cluster.nodes.values():
                    replica = await node.store.open("vol-t", 0)
                    assert replica.durable_seq == replica.applied_seq, node.id
        finally:
            loop.set_task_factory(None)
    # One Task per flush: the command's own, once it waits on an fdatasync (a future that
    # is not a `Completion`: `_Driven.yielded` in iscsi_server.py). None for the volume, the
    # access path or the node (the full path made three more). (The members answer their
    # Flush without a Task too: test_peer.py.)
    command = ("IscsiConnectionProtocol.", "ReplicatedVolume.", "AccessPath.", "DataNode.")
    per_flush = [n for n in made if n.startswith(command) and n != "DataNode._renew"]
    resumed = [n for n in per_flush if n == "IscsiConnectionProtocol._resume"]
    assert len(resumed) <= 8 and per_flush == resumed, per_flush


async def test_a_large_write_goes_on_as_a_view_of_its_iscsi_buffer(cluster: Cluster) -> None:
    # A write of VIEW_WRITES_FROM bytes or more is not copied at the access point: the
    # primary applies and forwards a view of the pooled buffer its Data-Outs landed in. The
    # pool hands that buffer out again only once no view of it is alive, so each write lands
    # intact on every member although the next write reuses the buffer.
    arrived: list[type] = []
    size = VIEW_WRITES_FROM * 2  # six of them within the one 1 MiB extent
    blocks_per_write = size // 512
    payloads = [os.urandom(size) for _ in range(6)]
    async with at_the_primary(cluster, 9) as (here, server, ini):
        write_now = here.node.write_now

        def spy(req: Any) -> Any:
            arrived.append(type(req.data))
            return write_now(req)

        here.node.write_now = spy  # type: ignore[method-assign]
        for k, payload in enumerate(payloads):
            ini.pending_write = payload  # immediate part, then Data-Outs answering R2Ts
            itt = ini.command(
                write10(blocks_per_write * k, blocks_per_write), write=size, imm=payload[:8192]
            )
            assert await ini.result(itt) == (0, b"")
        for k, payload in enumerate(payloads):
            got = await ini.result(
                ini.command(read10(blocks_per_write * k, blocks_per_write), read=size)
            )
            assert got == (0, payload), k
        (proto,) = server.connections
        pooled = proto.conn.pool.allocated
        del here.node.write_now
    assert arrived == [memoryview] * len(payloads)
    assert pooled <= 2  # the Data-Out buffer was reused from one write to the next
    await async_wait_for(
        lambda: _identical(cluster, "vol-t", 0), 10, "the replicas to settle identical"
    )
