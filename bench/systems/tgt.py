"""tgtd, the C userspace iSCSI target, serving one file as LUN 1: the single-copy anchor.

tgtd is started in the foreground on a private control port (so another tgtd on the machine is
not touched), configured with tgtadm with the PDU sizes lunastor negotiates, and stopped with
`tgtadm --op delete --mode system` (tgtd ignores SIGTERM alone), SIGKILL after 5 s.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.systems import listening
from tests.support.procs import wait_for

IQN = "iqn.2026-11.io.lunastor:bench-tgt"
LUN = 1
# the session parameters lunastor's target offers, so both run with the same PDU sizes
SESSION_PARAMETERS = (
    ("MaxRecvDataSegmentLength", "262144"),
    ("MaxXmitDataSegmentLength", "262144"),
    ("FirstBurstLength", "262144"),
    ("MaxBurstLength", "1048576"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
)


@dataclass(frozen=True)
class Tgt:
    pid: int
    portal: str
    iqn: str = IQN
    lun: int = LUN


def free_control_port() -> int:
    """A tgtd control port no tgtd on this machine uses (its socket is /var/run/tgtd/socket.N)."""
    while True:
        port = random.randint(2000, 30000)  # tgtd refuses control ports above 32767
        if not Path(f"/var/run/tgtd/socket.{port}").exists():
            return port


@contextmanager
def serve(image: Path, host: str, port: int, log: Path) -> Iterator[Tgt]:
    ctl = str(free_control_port())
    adm = ["tgtadm", "-C", ctl, "--lld", "iscsi"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["tgtd", "-f", "-C", ctl, "--iscsi", f"portal={host}:{port}"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def answers_or_exited() -> bool:
            show = [*adm, "--op", "show", "--mode", "target"]
            return (
                proc.poll() is not None or subprocess.run(show, capture_output=True).returncode == 0
            )

        wait_for(answers_or_exited, 10, "tgtd to answer tgtadm")
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-2:]
            raise RuntimeError(f"tgtd exited with {proc.returncode}: {' / '.join(tail)}")
        target = ["--tid", "1"]
        steps = [
            ["--op", "new", "--mode", "target", *target, "-T", IQN],
            ["--op", "new", "--mode", "logicalunit", *target, "--lun", str(LUN),
             "--bstype", "rdwr", "-b", str(image)],
            ["--op", "bind", "--mode", "target", *target, "-I", "ALL"],
        ]  # fmt: skip
        for key, value in SESSION_PARAMETERS:
            steps.append(["--op", "update", "--mode", "target", *target, "-n", key, "-v", value])
        for step in steps:
            subprocess.run([*adm, *step], check=True, capture_output=True, timeout=30)
        wait_for(lambda: listening(host, port), 10, f"tgtd to listen on {host}:{port}")
        yield Tgt(pid=proc.pid, portal=f"{host}:{port}")
    finally:
        stop = ["--op", "delete", "--mode", "target", "--tid", "1", "--force"]
        subprocess.run([*adm, *stop], capture_output=True, timeout=30)
        subprocess.run(
            ["tgtadm", "-C", ctl, "--op", "delete", "--mode", "system"],
            capture_output=True,
            timeout=30,
        )
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for leftover in (f"/var/run/tgtd/socket.{ctl}", f"/var/run/tgtd/socket.{ctl}.lock"):
            Path(leftover).unlink(missing_ok=True)
