"""The systems a benchmark measures, each brought up and down by one context manager.

- `tgt`: tgtd (the C userspace target) serving one file: the single-copy anchor.
- `gluster`: GlusterFS replica 3 on three brick directories, in a network namespace of the
  bench's own: the replicated anchor.
- `standalone`: `lunastor-chunk standalone` serving one file.
- `devcluster`: `lunastor dev up` (etcd, meta, chunk servers, redirector) and its volumes.

Each yields what a job needs: how qemu-img opens the image (`--image-opts`) and the processes
whose CPU is the system's cost.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from bench.cpu import ProcessGroup

# The initiator name every client logs in with (bench/iscsi_load.c has it compiled in).
BENCH_INITIATOR = "iqn.2026-11.io.lunastor:bench"


@dataclass(frozen=True)
class System:
    """One system under test as the job runner sees it."""

    name: str  # the --only key and JSON key: tgt, gluster, standalone, r1, r3, r3-vip
    label: str  # what the table rows say
    image_opts: str  # qemu-img --image-opts
    size: int  # bytes the jobs may address
    servers: ProcessGroup  # every server process of the system: CPU per IO is summed over them
    others: ProcessGroup | None = None  # processes of the system reported apart (lunastor: control)
    load_url: str | None = None  # iscsi:// URL for bench/iscsi_load.c, where it applies


def listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port (raises OSError if not)."""
    with socket.create_connection((host, port), timeout=0.5):
        return True


PR_SET_CHILD_SUBREAPER = 36  # prctl(2)


def become_subreaper() -> None:
    """Make the daemons our systems start (glusterd and its bricks, which fork into the
    background) our children once orphaned, so the bench reaps them itself instead of leaving
    zombies for PID 1 (which may reap late)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def reap(pids: Iterable[int]) -> None:
    """Collect the exit status of those of `pids` that are our exited children."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def reap_zombies(command_prefix: str) -> None:
    """Collect our exited children whose command name starts with `command_prefix` (orphans
    handed to us as subreaper; a zombie has left its namespace, so no namespace lists it)."""
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                head, _, tail = f.read().rpartition(")")
        except (FileNotFoundError, ProcessLookupError):
            continue
        state, ppid = tail.split()[:2]
        if state == "Z" and int(ppid) == me and head.partition("(")[2].startswith(command_prefix):
            reap([int(entry.name)])
