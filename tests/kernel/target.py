"""Host side: lunastor's standalone iSCSI target, run inside the guest's network namespace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.kernel.harness import GuestNet

REPO = Path(__file__).resolve().parents[2]


class TargetError(Exception):
    """The target did not come up; the message carries the end of its log."""


@dataclass
class StandaloneTarget:
    """`python -m lunastor.chunk.main standalone` over a sparse file, listening on the tap."""

    net: GuestNet
    workdir: Path
    iqn: str
    size: int
    allow: list[str] = field(default_factory=list)
    chap: str | None = None  # USER:SECRET
    log_level: str = "DEBUG"
    port: int = 3260
    proc: subprocess.Popen[bytes] | None = None

    @property
    def file(self) -> Path:
        return self.workdir / "lun0.img"

    @property
    def log(self) -> Path:
        return self.workdir / "target.log"

    @property
    def portal(self) -> str:
        return f"{self.net.host_addr}:{self.port}"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "lunastor.chunk.main", "standalone"]
        argv += ["--file", str(self.file), "--size", str(self.size), "--iqn", self.iqn]
        argv += ["--listen", self.portal, "--log-level", self.log_level]
        if self.allow:
            argv += ["--allow", *self.allow]
        if self.chap is not None:
            argv += ["--chap", self.chap]
        return argv

    def start(self, timeout: float = 30) -> StandaloneTarget:
        self.file.unlink(missing_ok=True)
        with open(self.file, "wb") as f:
            f.truncate(self.size)  # sparse
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = self.net.popen(self.argv(), log=self.log, env=env)
        ready = f"serving {self.iqn} on"
        deadline = time.monotonic() + timeout
        while ready not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise TargetError(f"target exited {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise TargetError(f"target not serving after {timeout}s: {self.tail()}")
            time.sleep(0.05)
        return self

    def stop(self, grace: float = 10) -> int | None:
        """SIGTERM (a clean shutdown), SIGKILL after `grace`; returns its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
