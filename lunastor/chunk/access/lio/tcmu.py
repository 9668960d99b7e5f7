"""The daemon side of one TCMU backstore: its uio device, mmapped, served by lunastor's SCSI layer.

The kernel queues each SCSI command of a `user:` backstore in the shared command ring and
signals the uio device; `TcmuDevice` reads the ring (`ring.CommandRing`, sans-IO), runs each
command through a `ScsiTarget` holding the volume's `LogicalUnit` (the same objects the
userspace iSCSI target serves), writes status, sense and data-in back, moves cmd_tail and
tells the kernel with a 4-byte write to the uio fd. Commands run concurrently and are
answered in whatever order they finish (the kernel allows out-of-order completion).

LIO sees every command before us: it answers REPORT LUNS and the reservation commands itself
(PERSISTENT RESERVE IN/OUT, RESERVE, RELEASE) and checks reservation conflicts, so this
handler sees one initiator, LIO, through one fixed nexus.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import os
import time
from pathlib import Path

from lunastor.chunk.access.lio.ring import Command, CommandRing, Response, RingError
from lunastor.iscsi.scsi.target import LogicalUnit, ScsiTarget
from lunastor.iscsi.scsi.types import Nexus, ScsiCommand, Status

log = logging.getLogger(__name__)

UIO_CLASS = Path("/sys/class/uio")
_NOTIFY = b"\x00\x00\x00\x00"
# fixed-format sense: HARDWARE ERROR / INTERNAL TARGET FAILURE, for a command we cannot run
_INTERNAL_FAILURE = bytes([0x70, 0, 0x04, 0, 0, 0, 0, 10] + [0] * 4 + [0x44, 0, 0, 0, 0, 0])


class TcmuError(Exception):
    """The uio device of a backstore could not be found or opened."""


def uio_name(hba: int, name: str, config: str) -> str:
    """What target_core_user names the uio device of backstore `name` (user_<hba>)."""
    return f"tcm-user/{hba}/{name}/{config}"


def find_uio(name: str, config: str, root: Path = UIO_CLASS) -> tuple[Path, int] | None:
    """The /dev/uioN of the user backstore `name` with `config`, and its map size."""
    suffix = f"/{name}/{config}"
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(root.iterdir()):
            try:
                label = (entry / "name").read_text().strip()
                if not (label.startswith("tcm-user/") and label.endswith(suffix)):
                    continue
                size = int((entry / "maps" / "map0" / "size").read_text().strip(), 0)
            except (OSError, ValueError):
                continue
            return Path("/dev") / entry.name, size
    return None


async def wait_for_uio(name: str, config: str, timeout: float) -> tuple[Path, int]:
    deadline = time.monotonic() + timeout
    while True:
        found = find_uio(name, config)
        if found is not None and found[0].exists():
            return found
        if time.monotonic() > deadline:
            raise TcmuError(f"no uio device for user backstore {name} ({config}) in {timeout}s")
        await asyncio.sleep(0.05)


class TcmuDevice:
    """Serves one user backstore: `start()` opens and maps it, `stop()` lets it go."""

    def __init__(self, name: str, config: str, unit: LogicalUnit, relative_port: int) -> None:
        self.name = name
        self.config = config
        self.unit = unit
        self.target = ScsiTarget(f"lio/{name}", {0: unit}, relative_port=relative_port)
        self.nexus = Nexus("lio", 0, f"lio/{name}", relative_port)
        # LIO reports its own unit attentions (power on, LUN changes): ours would be doubles
        self.unit.state_for(self.nexus).unit_attentions.clear()
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._ring: CommandRing | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.commands = 0  # commands answered (tests and logs)

    async def start(self, timeout: float = 10.0) -> None:
        path, size = await wait_for_uio(self.name, self.config, timeout)
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._ring = CommandRing(memoryview(self._map))
        except (OSError, RingError):
            os.close(fd)
            if self._map is not None:
                self._map.close()
            raise
        self._fd = fd
        asyncio.get_running_loop().add_reader(fd, self._ready)
        log.info("serving user backstore %s through %s (%d bytes mapped)", self.name, path, size)
        self._ready()  # commands queued before we opened the device

    def _ready(self) -> None:
        if self._ring is None:
            return
        try:
            os.read(self._fd, 4)  # the interrupt count; reading re-arms poll
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                log.error("reading %s's uio device: %s", self.name, exc)
        try:
            commands = self._ring.poll()
        except RingError as exc:
            # the ring is corrupt or not what this code understands: stop serving it rather
            # than answer wrongly; LIO times the commands out and fails them
            log.error("user backstore %s: %s; no longer served", self.name, exc)
            self._detach()
            return
        for command in commands:
            task = asyncio.create_task(self._run(command))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, command: Command) -> None:
        ring = self._ring
        if ring is None:
            return
        try:
            result = await self.target.execute(
                ScsiCommand(
                    self.nexus,
                    0,
                    command.cdb,
                    task_tag=command.cmd_id,
                    expected_length=command.length,
                    data_out=ring.read_data(command),
                )
            )
            read_len = None
            if result.data_in:
                read_len = ring.write_data(command, result.data_in)
            response = Response(int(result.status), result.sense, read_len)
        except Exception:  # execute catches everything; this is the ring code failing
            log.exception("user backstore %s: command %d", self.name, command.cmd_id)
            response = Response(int(Status.CHECK_CONDITION), _INTERNAL_FAILURE)
        if self._ring is not ring:
            return  # stopped meanwhile: the kernel fails the command at its timeout
        ring.complete(command.cmd_id, response)
        self.commands += 1
        try:
            os.write(self._fd, _NOTIFY)
        except OSError as exc:
            log.error("notifying the kernel for %s: %s", self.name, exc)

    def _detach(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.buf.release()

    async def stop(self) -> None:
        """Finish the commands in flight, then unmap and close the device."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        for task in list(self._tasks):
            task.cancel()
        self._detach()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view still exported by a cancelled command
                log.warning("user backstore %s: mapping still in use at stop", self.name)
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.target.close()
