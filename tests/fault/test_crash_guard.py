"""The chunk server's crash guard (lunastor/chunk/guard.py) against a real etcd: a process
SIGKILLed with a 30 s lease loses its lease and its record within a second, not 30 s."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lunastor.chunk.guard import GuardProtocolError, encode_config, encode_lease, parse_line
from lunastor.common.etcd import Etcd, EtcdConfig
from tests.support.etcd import EtcdServer
from tests.support.procs import async_wait_for

TTL = 30  # the lease would outlive the test by far without the guard
REPO = Path(__file__).resolve().parents[2]


def test_protocol_lines_round_trip_and_bad_lines_are_refused() -> None:
    config = EtcdConfig(endpoints=["10.0.0.1:2379"], namespace="/x", user="u", password="p")
    assert parse_line(encode_config(config)) == ("etcd", config)
    assert parse_line(encode_lease(0x7A3B00F1, 2.5)) == ("lease", (0x7A3B00F1, 2.5))
    assert parse_line(b"keep\n") == ("keep", None)
    for bad in (b"lease zz 2\n", b"lease 12\n", b"etcd {}x\n", b'etcd {"nope": 1}\n', b"x\n"):
        with pytest.raises(GuardProtocolError):
            parse_line(bad)


async def _child(
    etcd_server: EtcdServer, namespace: str, keep: bool
) -> tuple[subprocess.Popen[bytes], int]:
    argv = [sys.executable, "-m", "tests.fault.guarded_child", etcd_server.endpoint, namespace]
    argv += ["k", str(TTL)] + (["keep"] if keep else [])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
    assert line.startswith(b"ready "), line
    return proc, int(line.split()[1], 16)


def _guard_pids(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


async def test_a_sigkilled_process_loses_its_lease_at_once(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    config = EtcdConfig(endpoints=[etcd_server.endpoint], namespace=etcd_prefix, timeout=5)
    async with await Etcd.connect(config) as etcd:
        proc, lease = await _child(etcd_server, etcd_prefix, keep=False)
        guards = _guard_pids(proc.pid)
        assert len(guards) == 1, guards
        # the guard imports its etcd client and connects meanwhile, as beside a chunk server
        await asyncio.sleep(2.0)
        assert await etcd.get("k") is not None
        killed = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        async def gone() -> bool:
            return await etcd.get("k") is None

        await async_wait_for(gone, 5, "the record to go with the revoked lease", 0.01)
        took = time.monotonic() - killed
        print(f"\nrecord gone {took:.3f} s after SIGKILL (lease TTL {TTL} s)")
        # (8 ms measured; the bound leaves room for a loaded machine and still fails by far
        # without the guard, which leaves the record for the lease's 30 s)
        assert took < TTL / 3
        assert await etcd.time_to_live(lease) == -1
        await async_wait_for(
            lambda: asyncio.to_thread(lambda: not _alive(guards[0])), 20, "the guard to exit"
        )


async def test_in_parent_mode_the_guard_outlives_its_child_and_exits_with_its_status(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    # As a container's PID 1 (docker-compose.yml): the guard runs the server as its child,
    # forwards SIGTERM, and revokes the lease once the child is gone.
    config = EtcdConfig(endpoints=[etcd_server.endpoint], namespace=etcd_prefix, timeout=5)
    async with await Etcd.connect(config) as etcd:
        child = [sys.executable, "-m", "tests.fault.guarded_child", etcd_server.endpoint]
        child += [etcd_prefix, "k", str(TTL)]
        argv = [sys.executable, "-m", "lunastor.chunk.guard", "--", *child]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert line.startswith(b"ready "), line
        assert _guard_pids(proc.pid), "the server runs as the guard's child"
        assert await etcd.get("k") is not None
        killed = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # forwarded: the child dies of it (it handles none)

        async def gone() -> bool:
            return await etcd.get("k") is None

        await async_wait_for(gone, 10, "the record to go with the revoked lease", 0.01)
        assert time.monotonic() - killed < TTL / 3
        status = await asyncio.to_thread(proc.wait, 30)
        assert status == 128 + signal.SIGTERM


async def test_a_lease_the_process_let_go_of_is_left_alone(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    config = EtcdConfig(endpoints=[etcd_server.endpoint], namespace=etcd_prefix, timeout=5)
    async with await Etcd.connect(config) as etcd:
        proc, lease = await _child(etcd_server, etcd_prefix, keep=True)
        guards = _guard_pids(proc.pid)
        await asyncio.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        await async_wait_for(
            lambda: asyncio.to_thread(lambda: not _alive(guards[0])), 20, "the guard to exit"
        )
        assert await etcd.get("k") is not None  # left to expire by its TTL
        assert await etcd.time_to_live(lease) > 0
        await etcd.revoke(lease)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of an exited guard (its parent, the killed child, is gone: init reaps it)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
