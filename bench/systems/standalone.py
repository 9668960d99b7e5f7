"""`lunastor-chunk standalone`: the lunastor iSCSI target serving one local file (no etcd, no
replication), the front end alone."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.systems import listening
from tests.support.procs import wait_for

IQN = "iqn.2026-11.io.lunastor:bench-standalone"
LUN = 1


@dataclass(frozen=True)
class Standalone:
    pid: int
    portal: str
    iqn: str = IQN
    lun: int = LUN


@contextmanager
def serve(image: Path, host: str, port: int, log: Path) -> Iterator[Standalone]:
    argv = [
        sys.executable, "-m", "lunastor.chunk.main", "standalone",
        "--file", str(image), "--iqn", IQN, "--listen", f"{host}:{port}", "--lun", str(LUN),
        "--log-level", "warning",
    ]  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"lunastor-chunk standalone exited with {proc.returncode}")
            return listening(host, port)

        wait_for(up, 30, f"the standalone target on {host}:{port}")
        yield Standalone(pid=proc.pid, portal=f"{host}:{port}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
