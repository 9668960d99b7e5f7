"""The crash guard: a small process beside each chunk server that revokes the server's etcd
lease the moment the server's process is gone, however it went (SIGKILL, a crash, the OOM
killer). docs/faults.md, "Crash guard".

Without it a dead chunk server stays "live" in etcd until its lease runs out, up to
`lease_ttl` after its last keep-alive: the redirector keeps sending initiators to it, and the
access points wait for that expiry before another member takes over its extents. The host the
process died on knows at once that it is gone, so the guard tells etcd at once. (The
redirector's VIP guard, lunastor/redirector/vip.py, is the same idea for the VIP.)

**How it knows.** The chunk server starts the guard with a pipe as its stdin and keeps the
only write end (close-on-exec, so no other child inherits it). The kernel closes that end when
the server's last thread has gone through exit (the file table is shared by every thread and
released with the last one), so end of file on the guard's stdin means that no thread of the
server runs any more and none ever will: whatever the server can still "do" is what it had
handed to the kernel before, bytes already in socket buffers, and those are fenced by
generation like any late packet (docs/datapath.md). Revoking the lease then deletes the
server's live record and everything else bound to the lease (reservation registrations).

**Protocol** on stdin, one line each:

    etcd <JSON of the EtcdConfig fields>     first line: how to reach etcd (kept off argv)
    lease <id> <ttl>                          the server holds this lease now (hex id)
    keep                                      forget the lease: the server lets it run out
    (end of file)                             the server is gone: revoke the last lease, exit

**Parent mode**, `python -m lunastor.chunk.guard -- lunastor-chunk ARGS...`: the guard runs
the chunk server as its child, hands it the write end of the pipe (its number in
`LUNASTOR_CRASH_GUARD_FD`; the server then starts no guard of its own) and forwards SIGTERM,
SIGINT and SIGHUP to it. For containers, whose PID 1 the chunk server would otherwise be:
when PID 1 dies, the kernel kills every other process of the container at once, a child
guard included, before it could revoke anything. The guard exits with the server's status.

A child guard ignores SIGINT, SIGTERM and SIGHUP: a Ctrl-C at a terminal or a service manager's
SIGTERM reaches the whole process group, and the guard must outlive the server to do its job;
it exits on its own right after the server. It gives up revoking once the lease's TTL has
passed since the end of file (etcd expires the lease by then anyway). A frozen server
(SIGSTOP, a paused VM) or a dead host is not noticed here: that still waits for the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any

from lunastor.common.config import LogSettings
from lunastor.common.etcd import Etcd, EtcdConfig, EtcdError
from lunastor.common.logs import get_logger, setup_logging

MODULE = "lunastor.chunk.guard"
FD_ENV = "LUNASTOR_CRASH_GUARD_FD"  # parent mode: where the server writes its lines


def encode_config(config: EtcdConfig) -> bytes:
    return b"etcd " + json.dumps(asdict(config)).encode() + b"\n"


def encode_lease(lease_id: int, ttl: float) -> bytes:
    return f"lease {lease_id:x} {ttl:g}\n".encode()


class GuardProtocolError(ValueError):
    """A line on the guard's stdin it does not understand (a bug in the chunk server)."""


def parse_line(line: bytes) -> tuple[str, Any]:
    """One stdin line as (kind, value): ("etcd", EtcdConfig), ("lease", (id, ttl)), ("keep",
    None)."""
    text = line.decode(errors="replace").strip()
    kind, _, rest = text.partition(" ")
    try:
        if kind == "etcd":
            return kind, EtcdConfig(**json.loads(rest))
        if kind == "lease":
            lease, ttl = rest.split()
            return kind, (int(lease, 16), float(ttl))
        if kind == "keep" and not rest:
            return kind, None
    except (ValueError, TypeError) as exc:
        raise GuardProtocolError(f"bad {kind!r} line: {exc}") from None
    raise GuardProtocolError(f"unknown line {text[:80]!r}")


async def _connect(config: EtcdConfig) -> Etcd:
    while True:
        try:
            return await Etcd.connect(config)
        except EtcdError:
            await asyncio.sleep(0.5)


async def revoke(etcd: asyncio.Task[Etcd], lease: int, ttl: float) -> bool:
    """Revoke `lease`, retrying until `ttl` has passed (then etcd has expired it anyway)."""
    deadline = time.monotonic() + ttl
    while time.monotonic() < deadline:
        try:
            client = await asyncio.wait_for(asyncio.shield(etcd), deadline - time.monotonic())
            await client.revoke(lease)
            return True
        except (EtcdError, TimeoutError):
            await asyncio.sleep(0.1)
    return False


async def guard(reader: asyncio.StreamReader) -> int:
    log = get_logger(component="crash-guard")
    etcd: asyncio.Task[Etcd] | None = None
    lease, ttl = 0, 0.0
    try:
        while line := await reader.readline():
            kind, value = parse_line(line)
            if kind == "etcd" and etcd is None:
                etcd = asyncio.create_task(_connect(value))
            elif kind == "lease":
                lease, ttl = value
            elif kind == "keep":
                lease = 0
        gone = time.monotonic()
        if not lease or etcd is None:
            return 0
        if await revoke(etcd, lease, ttl):
            log.warning(
                "chunk server exited: its lease revoked",
                lease=f"{lease:x}",
                after=round(time.monotonic() - gone, 3),
            )
            return 0
        log.error("chunk server exited: could not revoke its lease", lease=f"{lease:x}")
        return 1
    finally:
        if etcd is not None:
            if etcd.done() and not etcd.cancelled() and etcd.exception() is None:
                with contextlib.suppress(EtcdError):
                    await etcd.result().close()
            else:
                etcd.cancel()


async def _main(pipe: int | None = None) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    source = sys.stdin if pipe is None else os.fdopen(pipe, "rb", buffering=0)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), source)
    return await guard(reader)


def _parent(argv: list[str]) -> int:
    """Parent mode: run `argv` (the chunk server) as our child and guard it."""
    read, write = os.pipe()  # both close-on-exec; the child gets `write` by pass_fds
    env = {**os.environ, FD_ENV: str(write)}
    child = subprocess.Popen(argv, env=env, pass_fds=(write,))
    os.close(write)  # the child holds the only write end: end of file when it is gone

    def forward(sig: int, _: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(sig)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        asyncio.run(_main(read))
    except GuardProtocolError as exc:
        print(f"{MODULE}: {exc}", file=sys.stderr)
    status = child.wait()
    return 128 - status if status < 0 else status  # killed by a signal: the shell's 128 + n


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    setup_logging(LogSettings(level="info", format="kv"), "chunk-guard")
    if args[:1] == ["--"] and len(args) > 1:
        return _parent(args[1:])
    if args:
        print(f"usage: python -m {MODULE} [-- lunastor-chunk ARGS...]", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        return asyncio.run(_main())
    except GuardProtocolError as exc:
        print(f"{MODULE}: {exc}", file=sys.stderr)
        return 2


class CrashGuard:
    """The chunk server's side: starts the guard and tells it the current lease."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None
        self.pipe: int | None = None  # parent mode: the write end our guard handed us

    async def start(self) -> CrashGuard:
        inherited = os.environ.pop(FD_ENV, "")
        if inherited:  # our parent is the guard (parent mode)
            self.pipe = int(inherited)
            os.set_inheritable(self.pipe, False)  # none of our own children holds it
        else:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                MODULE,
                stdin=asyncio.subprocess.PIPE,
                close_fds=True,
            )
        self._send(encode_config(self.config))
        return self

    def _send(self, line: bytes) -> None:
        if self.pipe is not None:
            with contextlib.suppress(OSError):
                os.write(self.pipe, line)  # a few bytes: never blocks on a pipe
            return
        proc = self.proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            proc.stdin.write(line)

    @property
    def fd(self) -> int | None:
        """The pipe's write end: a process holding it keeps the guard waiting (a chunk
        server's workers hold it, so the guard revokes only once all are gone)."""
        if self.pipe is not None:
            return self.pipe
        stdin = self.proc.stdin if self.proc is not None else None
        pipe = stdin.get_extra_info("pipe") if stdin is not None else None
        return pipe.fileno() if pipe is not None else None

    def lease(self, lease_id: int, ttl: float) -> None:
        self._send(encode_lease(lease_id, ttl))

    def keep(self) -> None:
        """Forget the lease: a clean stop revoked it already, or lets it run out on purpose."""
        self._send(b"keep\n")

    async def close(self) -> None:
        if self.pipe is not None:
            os.close(self.pipe)  # our parent, the guard, sees the end of file
            self.pipe = None
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


if __name__ == "__main__":
    sys.exit(main())
