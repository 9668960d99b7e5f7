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
    log_level: str = "INFO"  # DEBUG traces every PDU, which turns the fast path off
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

    def start(self, timeout: float = 30, fresh: bool = True) -> StandaloneTarget:
        """Start serving; `fresh` makes a new sparse backing file and a new log."""
        if fresh:
            self.file.unlink(missing_ok=True)
            with open(self.file, "wb") as f:
                f.truncate(self.size)  # sparse
        ready = f"serving {self.iqn} on"
        # after a restart, only what this process logs counts (the log can be ~60 MB)
        offset = 0 if fresh or not self.log.exists() else self.log.stat().st_size
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = self.net.popen(self.argv(), log=self.log, env=env, append=not fresh)
        deadline = time.monotonic() + timeout
        while ready not in self._log_since(offset):
            if self.proc.poll() is not None:
                raise TargetError(f"target exited {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise TargetError(f"target not serving after {timeout}s: {self.tail()}")
            time.sleep(0.05)
        return self

    def restart(self) -> str:
        """Stop (SIGTERM) and start again over the same file; says how long it was down."""
        started = time.monotonic()
        status = self.stop()
        if status != 0:
            raise TargetError(f"target exited {status} on SIGTERM: {self.tail()}")
        self.start(fresh=False)
        return f"target restarted, down {time.monotonic() - started:.1f}s"

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

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

    def tail(self, chars: int = 4000) -> str:
        """The end of the log (DEBUG lines can be a megabyte each)."""
        try:
            size = self.log.stat().st_size
            return self._log_since(max(0, size - chars))
        except OSError:
            return ""
