"""Several worker processes per chunk server: one chunk server on every core (docs/scale.md,
"A chunk server on every core").

With `workers = N` (N > 1) the chunk server's process is worker 0: it holds the lease, the
crash guard, the registration and the live record as before, runs a data path of its own, and
starts workers 1..N-1 as child processes, each with a data path of its own (its own etcd
client, extent map, data node, access point and iSCSI sessions). One identity to the cluster:
the extent map still names chunk servers, never workers.

* **Ownership.** Every extent of a volume belongs to worker `crc32(volume id) % N` (`owner`;
  a snapshot's preserved copy is its volume's). Only its owner opens the replica files (the
  store refuses the others), runs the primary, repairs, scrubs and collects them. A clone's
  first copy of an extent is made by the owner of the origin (it has the source open) and
  left closed on disk for the clone's owner, which opens it from there.
* **Addressing.** Worker i listens for the data protocol on `data_listen`'s port + i; the
  live record lists every worker's address (`ChunkServerStatus.data_workers`), so a peer
  sends a request for an extent straight to its owner. A request that reaches another worker
  anyway (a peer that does not know the list, a count that changed) is handed to the owner
  over its data port: one local hop. An access point reaching an extent of a sibling worker
  takes the same hop, exactly the path to another server.
* **iSCSI.** Worker 0 accepts every connection on `iscsi_listen`, reads its Login Request
  without consuming it (MSG_PEEK) and hands the connection (SCM_RIGHTS) to the worker that
  owns every volume the initiator sees behind that target: the session then does all its IO
  in its own process, without a hop. A login whose volumes are spread over workers, or a
  discovery session, goes to the worker with the fewest open connections.
* **The lease.** Worker 0's lease is every worker's: it writes the lease's id and the
  monotonic time until which it is surely alive into memory shared with the workers
  (`Shared`, a seqlock), and a worker acknowledges IO only before that deadline, as worker 0
  does. A worker 0 that stops refreshing it (stuck, killed) lets it run out in every worker.
* **One failure unit.** Every worker holds the crash guard's pipe, so the guard revokes the
  lease only once no process of the server runs any more; a worker dies with worker 0
  (PR_SET_PDEATHSIG), and worker 0 kills the others and exits the moment one worker dies: a
  worker's death is the server's death, seen at once by the cluster (docs/faults.md).
* **What each reports.** Each worker's `/metrics` and `/healthz` are on `admin_listen`'s
  port + i. The volumes revision each worker's data path has applied is written to its slot
  in the shared memory; worker 0 publishes the lowest at `Keys.live_seen` (the snapshot
  fence, docs/snapshots.md). Reservation acknowledgements and QoS demands are per access
  point, so each worker > 0 registers them as `<chunk id>~w<i>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from lunastor.common.config import ConfigError
from lunastor.common.daemon import StartupError, format_hostport, parse_hostport
from lunastor.common.etcd import Etcd, EtcdConfig, EtcdError
from lunastor.common.logs import get_logger
from lunastor.common.records import parse_preserved

if TYPE_CHECKING:
    from lunastor.chunk.config import ChunkConfig

# set by worker 0 for the others: "<index> <count> <shared fd> <hand-off fd> <guard fd> <pid>"
WORKER_ENV = "LUNASTOR_CHUNK_WORKER"
PR_SET_PDEATHSIG = 1
MAX_WORKERS = 64
LEASE_SHARE_INTERVAL = 0.05  # seconds between worker 0's writes of its lease deadline
_SLOT = 64  # bytes per worker slot in the shared memory, after a header of one slot
_U64 = struct.Struct("<Q")
_LEASE = struct.Struct("<Qd")  # lease id, deadline (time.monotonic(), shared by every process)
_COUNTS = struct.Struct("<QQ")  # seen volumes revision, iSCSI connections closed


def _log() -> Any:
    return get_logger(component="workers")


def owner(volume: str, count: int) -> int:
    """The worker that owns every extent of store volume `volume` on a server of `count`
    workers: a hash of the volume's id (a snapshot's preserved copy `<volume>.e<epoch>` is
    its volume's)."""
    if count < 1:
        raise ValueError(f"a server has at least one worker, got {count}")
    kept = parse_preserved(volume)
    base = kept[0] if kept is not None else volume
    return zlib.crc32(base.encode()) % count


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """This process's place among its server's workers."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_WORKERS or not 0 <= self.index < self.count:
            raise ValueError(f"worker {self.index} of {self.count}: out of range")

    def owns(self, volume: str, index: int = 0) -> bool:
        """Whether extent `index` of store volume `volume` is ours (any index: the volume)."""
        return owner(volume, self.count) == self.index

    @property
    def access_id_suffix(self) -> str:
        """What worker i > 0 appends to the chunk id where each access point needs its own
        key (reservation acknowledgements, QoS demands); "" for worker 0."""
        return f"~w{self.index}" if self.index else ""


def worker_address(address: str, index: int, what: str) -> str:
    """Worker `index`'s address: `address`'s port + index."""
    host, port = parse_hostport(address, what)
    if port == 0 and index:
        raise ConfigError(f"{what}: workers > 1 need a fixed port (worker i listens on port + i)")
    if port + index > 65535:
        raise ConfigError(f"{what}: port {port} + {index} workers is out of range")
    return format_hostport(host, port + index)


def worker_config(config: ChunkConfig, index: int) -> ChunkConfig:
    """Worker `index`'s configuration: its own data and admin ports; LIO only in worker 0."""
    if index == 0:
        return config
    return replace(
        config,
        data_listen=worker_address(config.data_listen, index, "data_listen"),
        data_advertise=worker_address(config.data_address, index, "data_listen"),
        admin_listen=worker_address(config.admin_listen, index, "admin_listen"),
        lio_export=False,
    )


def data_addresses(config: ChunkConfig) -> list[str]:
    """Every worker's advertised data address, by worker index."""
    return [worker_address(config.data_address, i, "data_listen") for i in range(config.workers)]


def pick_worker(load: Sequence[int], turn: int) -> int:
    """The worker a new iSCSI connection goes to: the fewest open connections, ties taken in
    turn starting at `turn % len(load)`."""
    n = len(load)
    return min(range(n), key=lambda i: (load[i], (i - turn) % n))


LOGIN_PEEK_TIMEOUT = 2.0  # seconds a new connection's login request is waited for
_BHS = 48  # an iSCSI PDU's basic header segment


def login_names(data: bytes) -> tuple[str, str] | None:
    """(InitiatorName, TargetName) of the Login Request `data` starts with, once `data`
    holds all of it; None if it is not one, not whole yet, or names no target (discovery)."""
    if len(data) < _BHS or data[0] & 0x3F != 0x03:
        return None
    start = _BHS + data[4] * 4
    end = start + int.from_bytes(data[5:8], "big")
    if len(data) < end:
        return None
    keys = {}
    for item in data[start:end].split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            keys[key.decode(errors="replace")] = value.decode(errors="replace")
    initiator, target = keys.get("InitiatorName"), keys.get("TargetName")
    return (initiator, target) if initiator and target else None


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def login_length(data: bytes) -> int | None:
    """How many bytes the Login Request `data` starts with spans (None: not known yet, or
    not a login request)."""
    if len(data) < _BHS or data[0] & 0x3F != 0x03:
        return None
    return _BHS + data[4] * 4 + int.from_bytes(data[5:8], "big")


async def peek_login(
    conn: socket.socket, timeout: float = LOGIN_PEEK_TIMEOUT
) -> tuple[str, str] | None:
    """The names of a new connection's Login Request, read without consuming it (the worker
    that takes the connection reads it again), within `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            data = conn.recv(1 << 16, socket.MSG_PEEK)
        except BlockingIOError:
            data = None
        except OSError:
            return None
        if data == b"":
            return None  # closed
        if data is not None:
            want = login_length(data)
            if want is None and len(data) >= _BHS:
                return None  # not a login request
            if want is not None and len(data) >= want:
                return login_names(data)
            await asyncio.sleep(0.005)  # part of it: the rest is on its way
            continue
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(conn.fileno(), _settle, readable)
        try:
            await asyncio.wait_for(readable, max(0.0, deadline - loop.time()))
        except TimeoutError:
            return None
        finally:
            loop.remove_reader(conn.fileno())
    return None


# -- memory shared by the workers ------------------------------------------------------------


class Shared:
    """The lease (written by worker 0) and one slot per worker (written by that worker), in a
    memfd every worker maps. The lease is a seqlock: a reader never takes a torn pair."""

    def __init__(self, fd: int, count: int) -> None:
        self.fd = fd
        self.count = count
        self.map = mmap.mmap(fd, _SLOT * (count + 1))

    @classmethod
    def create(cls, count: int) -> Shared:
        fd = os.memfd_create("lunastor-chunk-workers", 0)
        os.ftruncate(fd, _SLOT * (count + 1))
        return cls(fd, count)

    def set_lease(self, lease: int, deadline: float) -> None:
        (seq,) = _U64.unpack_from(self.map, 0)
        _U64.pack_into(self.map, 0, seq + 1)  # odd: being written
        _LEASE.pack_into(self.map, 8, lease, deadline)
        _U64.pack_into(self.map, 0, seq + 2)

    def lease(self) -> tuple[int, float]:
        """(lease id, `time.monotonic()` until which it is surely alive); (0, 0.0) if none."""
        for _ in range(100):
            (before,) = _U64.unpack_from(self.map, 0)
            lease, deadline = _LEASE.unpack_from(self.map, 8)
            (after,) = _U64.unpack_from(self.map, 0)
            if before == after and not before & 1:
                return (lease, deadline) if lease else (0, 0.0)
        return 0, 0.0  # the writer is stuck mid-write: not provably alive

    def alive(self) -> bool:
        lease, deadline = self.lease()
        return bool(lease) and time.monotonic() < deadline

    def _slot(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise IndexError(f"no worker {index} of {self.count}")
        return _SLOT * (index + 1)

    def counts(self, index: int) -> tuple[int, int]:
        """Worker `index`'s (volumes revision its data path applied, iSCSI connections it
        closed). The revision is 1 from the worker's start until its data path loaded."""
        seen, closed = _COUNTS.unpack_from(self.map, self._slot(index))
        return seen, closed

    def set_seen(self, index: int, revision: int) -> None:
        _U64.pack_into(self.map, self._slot(index), revision)

    def set_closed(self, index: int, closed: int) -> None:
        _U64.pack_into(self.map, self._slot(index) + 8, closed)

    def started(self) -> bool:
        """Every worker > 0 has said it runs (its revision is set)."""
        return all(self.counts(i)[0] for i in range(1, self.count))

    def lowest_seen(self, own: int) -> int:
        """The lowest volumes revision applied by worker 0 (`own`) and every other worker:
        the server's, for the snapshot fence (`Keys.live_seen` only grows, so worker 0 starts
        its data path only once every worker has set its revision, to 1 at least)."""
        return min([own, *(self.counts(i)[0] for i in range(1, self.count))])

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


# -- worker 0: starting the others, watching them, handing them connections ------------------


class WorkerGroup:
    """Worker 0's side: starts workers 1..N-1, hands them iSCSI connections, and ends the
    server when one of them dies."""

    def __init__(
        self, argv: Sequence[str], count: int, guard_fd: int | None, on_death: Callable[[], None]
    ) -> None:
        self.argv = list(argv)
        self.count = count
        self.guard_fd = guard_fd
        self.on_death = on_death
        self.shared = Shared.create(count)
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._handoff: dict[int, socket.socket] = {}
        self._handed = [0] * count  # connections handed to each worker (ours: adopted)
        self._turn = 0  # rotates ties, so that short sessions one after another spread too
        self._watch: list[asyncio.Task[None]] = []
        self._lease: asyncio.Task[None] | None = None
        self._accept: asyncio.Task[None] | None = None
        self._listener: socket.socket | None = None
        self.stopping = False

    async def start(self, lease: Callable[[], tuple[int, float]]) -> None:
        """Start the workers; `lease()` is ours, (id, monotonic deadline), shared with them."""
        self._lease = asyncio.create_task(self._share_lease(lease), name="workers' lease")
        for i in range(1, self.count):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            fds = [self.shared.fd, theirs.fileno()]
            if self.guard_fd is not None:
                fds.append(self.guard_fd)
            guard = self.guard_fd if self.guard_fd is not None else -1
            place = f"{i} {self.count} {self.shared.fd} {theirs.fileno()} {guard} {os.getpid()}"
            env = {**os.environ, WORKER_ENV: place}
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "lunastor.chunk.main",
                *self.argv,
                env=env,
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
            )
            theirs.close()
            self.procs[i] = proc
            self._handoff[i] = ours
            self._watch.append(asyncio.create_task(self._watch_one(i, proc), name=f"worker {i}"))
        _log().info("workers started", count=self.count, pids=[p.pid for p in self.procs.values()])

    async def _share_lease(self, lease: Callable[[], tuple[int, float]]) -> None:
        while True:
            self.shared.set_lease(*lease())
            await asyncio.sleep(LEASE_SHARE_INTERVAL)

    async def _watch_one(self, index: int, proc: asyncio.subprocess.Process) -> None:
        status = await proc.wait()
        if self.stopping:
            return
        _log().critical("worker died: the chunk server ends with it", worker=index, status=status)
        self.on_death()

    async def wait_started(self, timeout: float = 120.0) -> None:
        """Until every worker runs (see `Shared.lowest_seen`)."""
        deadline = time.monotonic() + timeout
        while not self.shared.started():
            if time.monotonic() > deadline:
                raise StartupError(f"workers did not start within {timeout:.0f} s")
            await asyncio.sleep(0.05)

    def open_connections(self, own: int) -> list[int]:
        """Open iSCSI connections per worker (worker 0's: `own`); a connection handed over
        counts from the hand-over until its worker has closed it."""
        out = [own]
        for i in range(1, self.count):
            _, closed = self.shared.counts(i)
            out.append(self._handed[i] - closed)
        return out

    def listen(self, listen: tuple[str, int]) -> None:
        """Listen for iSCSI on `listen` now (initiators wait in the backlog until
        `serve_iscsi`, rather than be refused while the data paths start)."""
        host, port = listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            raise StartupError(f"iscsi_listen {host}:{port}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        self._listener = sock

    def serve_iscsi(
        self,
        adopt: Callable[[socket.socket], Any],
        own_connections: Callable[[], int],
        worker_for: Callable[[str, str], int | None],
    ) -> None:
        """Accept and hand each connection over: a login to the worker that owns every
        volume its initiator sees behind its target (`worker_for(initiator, target)`), else
        to the least busy worker."""
        sock = self._listener
        assert sock is not None, "listen() first"
        self._accept = asyncio.create_task(
            self._accept_loop(sock, adopt, own_connections, worker_for), name="iscsi hand-off"
        )

    async def _accept_loop(
        self,
        sock: socket.socket,
        adopt: Callable[[socket.socket], Any],
        own_connections: Callable[[], int],
        worker_for: Callable[[str, str], int | None],
    ) -> None:
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[None]] = set()
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setblocking(False)
            task = loop.create_task(self._dispatch(conn, adopt, own_connections, worker_for))
            pending.add(task)
            task.add_done_callback(pending.discard)

    async def _dispatch(
        self,
        conn: socket.socket,
        adopt: Callable[[socket.socket], Any],
        own_connections: Callable[[], int],
        worker_for: Callable[[str, str], int | None],
    ) -> None:
        names = await peek_login(conn)
        target = worker_for(*names) if names is not None else None
        if target is None or not 0 <= target < self.count:
            target = pick_worker(self.open_connections(own_connections()), self._turn)
            self._turn += 1
        if target == 0:
            adopt(conn)
            return
        try:
            socket.send_fds(self._handoff[target], [b"c"], [conn.fileno()])
            self._handed[target] += 1
        except OSError as exc:
            _log().error("hand-off failed", worker=target, error=str(exc))
        finally:
            conn.close()

    async def stop(self) -> None:
        self.stopping = True
        if self._accept is not None:
            self._accept.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept
        if self._listener is not None:
            self._listener.close()
        for ours in self._handoff.values():
            ours.close()  # a worker stops when its hand-off socket ends (signals it ignores)
        for i, proc in self.procs.items():
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                _log().error("worker did not stop: killed", worker=i)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in [*self._watch, *([self._lease] if self._lease is not None else [])]:
            task.cancel()

    def kill_all(self) -> None:
        """A worker died: end the others at once (the caller then exits)."""
        self.stopping = True
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


# -- workers 1..N-1 ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerEnv:
    spec: WorkerSpec
    shared_fd: int
    handoff_fd: int
    guard_fd: int  # -1: no crash guard
    parent: int  # worker 0's pid


def worker_env() -> WorkerEnv | None:
    """This process's place, if worker 0 started it (and the variable is consumed)."""
    raw = os.environ.pop(WORKER_ENV, "")
    if not raw:
        return None
    index, count, shared_fd, handoff_fd, guard_fd, parent = (int(x) for x in raw.split())
    return WorkerEnv(WorkerSpec(index, count), shared_fd, handoff_fd, guard_fd, parent)


async def serve_worker(config: ChunkConfig, env: WorkerEnv, stop: asyncio.Event) -> int:
    """Worker i > 0 (`main.serve` for worker 0): a data path under worker 0's lease."""
    from aiohttp import web

    from lunastor.chunk.registration import load_or_create_id
    from lunastor.chunk.service import DataPath
    from lunastor.common.daemon import start_http
    from lunastor.common.events import EVENTS
    from lunastor.common.logs import setup_logging
    from lunastor.common.metrics import add_admin_routes, describe_daemon
    from lunastor.common.settings import etcd_client_config

    die_with_parent(env.parent)
    # A terminal's Ctrl-C or a service manager's SIGTERM may reach the whole process group:
    # only worker 0 decides, and a worker stops when worker 0 closes its hand-off socket.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    spec = env.spec
    shared = Shared(env.shared_fd, spec.count)
    shared.set_seen(spec.index, 1)  # running: worker 0 may start its data path (lowest_seen)
    if env.guard_fd >= 0:
        os.set_inheritable(env.guard_fd, False)  # held, never written: the guard's EOF waits
    chunk_id = load_or_create_id(config.data_dirs)
    wlog = setup_logging(config.log, "chunk", chunk=chunk_id, worker=spec.index)
    describe_daemon("chunk")
    own = worker_config(config, spec.index)
    datapath: DataPath | None = None

    async def health() -> dict[str, Any]:
        alive = shared.alive()
        status = "ok" if alive and datapath is not None else "degraded"
        return {"status": status, "id": chunk_id, "worker": spec.index, "lease": alive}

    app = web.Application()
    add_admin_routes(app, health)
    admin = await start_http(app, own.admin_listen, "admin_listen")
    adopted = 0
    client = await connect_patiently(etcd_client_config(config.etcd), timeout=60.0)
    assert client is not None  # no `stop`: a client or StartupError
    async with client as etcd:
        EVENTS.bind(etcd, chunk_id)
        place = Place(spec, shared, data_addresses(config))
        datapath = DataPath(own, etcd, chunk_id, shared.alive, shared.lease, None, place)
        await datapath.start()

        def adopt(sock: socket.socket) -> None:
            nonlocal adopted
            adopted += 1
            assert datapath is not None
            datapath.adopt(sock)

        def ended() -> None:
            if os.getppid() != env.parent:  # worker 0 is gone: so are we, at once (no stop)
                os._exit(1)
            stop.set()

        adopter = Adopter(env.handoff_fd, adopt, on_end=ended)
        adopter.start()
        gc.collect()  # as worker 0 does (main.serve)
        gc.freeze()
        wlog.info("chunk worker up", worker=spec.index, data=own.data_address)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
            iscsi = datapath.iscsi
            shared.set_closed(spec.index, adopted - (len(iscsi.connections) if iscsi else 0))
        wlog.info("chunk worker stopping", worker=spec.index)
        adopter.stop()
        await datapath.stop()
        await EVENTS.unbind()
    await admin.close()
    return 0


CONNECT_BACKOFF = (0.5, 5.0)  # seconds: the first retry's wait, doubled up to the last


async def connect_patiently(
    config: EtcdConfig, stop: asyncio.Event | None = None, timeout: float | None = None
) -> Etcd | None:
    """Connect to etcd, retrying with backoff while it does not answer: a chunk server
    started before etcd (a node's boot, a whole-cluster power-on) waits for it instead of
    exiting. None if `stop` is set first; StartupError after `timeout` s (a worker > 0,
    whose worker 0 has just reached etcd: then something is wrong, and it ends the server)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    wait = CONNECT_BACKOFF[0]
    while True:
        try:
            return await Etcd.connect(config)
        except EtcdError as exc:
            if deadline is not None and time.monotonic() > deadline:
                raise StartupError(f"etcd: {exc}") from None
            _log().warning("etcd does not answer yet: retrying", error=str(exc), retry_in=wait)
        if stop is None:
            await asyncio.sleep(wait)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            if stop.is_set():
                return None
        wait = min(wait * 2, CONNECT_BACKOFF[1])


@dataclass(frozen=True)
class Place:
    """What a worker's data path needs to know of the server's workers."""

    spec: WorkerSpec
    shared: Shared
    siblings: list[str]  # every worker's data address, by index


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when worker 0 goes, however it goes."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it went before the prctl
        os.kill(os.getpid(), signal.SIGKILL)


class Adopter:
    """A worker's end of the hand-off: each connection worker 0 passes becomes an iSCSI
    connection here."""

    def __init__(
        self, fd: int, adopt: Callable[[socket.socket], Any], on_end: Callable[[], Any]
    ) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.adopt = adopt
        self.on_end = on_end  # worker 0 closed its end: stop

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(self.sock, 16, 8)
            except BlockingIOError:
                return
            except OSError as exc:
                _log().error("hand-off socket failed", error=str(exc))
                self.stop()
                return
            if not fds:  # worker 0 closed its end
                self.stop()
                self.on_end()
                return
            for fd in fds:
                self.adopt(socket.socket(fileno=fd))

    def stop(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
