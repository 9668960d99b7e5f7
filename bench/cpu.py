"""CPU accounting for benchmarks: server processes from /proc, the client from its rusage.

A server's CPU over a job is the sum, over every process of the system, of the change in
utime + stime of `/proc/<pid>/stat` (which covers all the threads of the process, the exited
ones included). A process is known by (pid, start time), so a pid reused during a job is not
mistaken for the one sampled before it; a process that started during the job counts from
zero; one that exited during the job is reported as `vanished` (its CPU since the last sample
is lost: /proc forgets it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")

# (pid, start time in clock ticks since boot): one process, even if its pid is reused later
ProcessKey = tuple[int, int]


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/<pid>/stat the accounting needs (all in clock ticks)."""

    pid: int
    utime: int
    stime: int
    starttime: int

    @property
    def key(self) -> ProcessKey:
        return (self.pid, self.starttime)


def parse_proc_stat(text: str) -> ProcStat:
    """Parse one /proc/<pid>/stat line. The command name (field 2) may hold spaces and
    parentheses, so fields are counted from the last ')'; utime, stime and starttime are
    fields 14, 15 and 22 (proc(5))."""
    head, _, tail = text.rpartition(")")
    if not _:
        raise ValueError(f"not a /proc/<pid>/stat line: {text[:80]!r}")
    pid = int(head.split("(", 1)[0])
    fields = tail.split()  # fields[0] is field 3 (state)
    return ProcStat(
        pid=pid, utime=int(fields[11]), stime=int(fields[12]), starttime=int(fields[19])
    )


def read_proc_stat(pid: int) -> ProcStat | None:
    """The process's counters, or None when it is gone."""
    try:
        return parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())
    except (FileNotFoundError, ProcessLookupError):
        return None


def sample(pids: Iterable[int]) -> dict[ProcessKey, int]:
    """utime + stime (clock ticks) of each live process in `pids`."""
    out: dict[ProcessKey, int] = {}
    for pid in pids:
        stat = read_proc_stat(pid)
        if stat is not None:
            out[stat.key] = stat.utime + stat.stime
    return out


@dataclass(frozen=True)
class CpuDelta:
    """CPU a group of processes used between two samples."""

    seconds: float
    processes: int  # processes seen in the second sample
    vanished: int  # processes of the first sample gone by the second

    def per_io_us(self, ios: int) -> float:
        return self.seconds * 1e6 / ios if ios else float("nan")

    def percent(self, elapsed: float) -> float:
        """CPU over `elapsed` wall seconds, in percent of one core."""
        return self.seconds * 100 / elapsed if elapsed > 0 else float("nan")


def delta(before: Mapping[ProcessKey, int], after: Mapping[ProcessKey, int]) -> CpuDelta:
    ticks = sum(cpu - before.get(key, 0) for key, cpu in after.items())
    vanished = sum(1 for key in before if key not in after)
    return CpuDelta(seconds=ticks / CLK_TCK, processes=len(after), vanished=vanished)


class ProcessGroup:
    """The processes of one system, named for reports ("chunk servers", "glusterd + bricks").

    `pids` is called at each sample, so a group whose membership changes (Gluster's bricks
    start after glusterd; a chunk server restarted by a rebuild stage) is followed."""

    def __init__(self, label: str, pids: Callable[[], Sequence[int]]) -> None:
        self.label = label
        self.pids = pids

    def sample(self) -> dict[ProcessKey, int]:
        return sample(self.pids())


@dataclass(frozen=True)
class ChildRun:
    """A client process run to completion: its exit code, output and own CPU."""

    returncode: int
    output: str
    wall_seconds: float
    cpu_seconds: float  # user + system of the child (its rusage), all its threads
    timed_out: bool


def run_child(argv: Sequence[str], timeout: float, stop_after: str | None = None) -> ChildRun:
    """Run `argv` (stdout and stderr together) and report the child's own CPU from wait4's
    rusage. Killed after `timeout` seconds, and when this process is interrupted; killed as
    soon as its output contains `stop_after`, if given (a client whose report is complete
    but whose exit would be slow: gfapi's shutdown waits 10 s)."""
    read_fd, write_fd = os.pipe()
    start = time.monotonic()
    proc = subprocess.Popen(list(argv), stdout=write_fd, stderr=subprocess.STDOUT)
    os.close(write_fd)
    chunks: list[bytes] = []
    marker = stop_after.encode() if stop_after else None

    # The child is reaped only by the wait4 below, which alone reports its rusage (so not
    # proc.kill(): it polls first, and a poll may reap). A kill is sent only until the child is
    # known to have exited (waitid with WNOWAIT leaves it a zombie, holding its pid): never to
    # a reused pid.
    lock = threading.Lock()
    exited = False

    def kill() -> None:
        with lock:
            if not exited:
                os.kill(proc.pid, signal.SIGKILL)

    def drain() -> None:
        while block := os.read(read_fd, 65536):
            chunks.append(block)
            if marker is not None and marker in b"".join(chunks[-2:]):
                kill()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        kill()

    killer = threading.Timer(timeout, expire)
    killer.start()
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        with lock:
            exited = True
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    os.close(read_fd)
    output = b"".join(chunks)
    return ChildRun(
        returncode=0 if marker is not None and marker in output else proc.returncode,
        output=output.decode(errors="replace"),
        wall_seconds=time.monotonic() - start,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        timed_out=expired.is_set(),
    )
