"""Guest side: run a scenario as named, timed steps and write results.json after each one.

Runs under the guest's /usr/bin/python3 (the host's, over 9p) with the standard library only.
A scenario is a function of a `Run`; the first failing step ends it. results.json is rewritten
after every step, so a guest killed at its time limit still leaves the steps it finished.

    {"scenario": "...", "status": "passed" | "failed" | "running", "boot_seconds": 9.1,
     "steps": [{"name": "login", "seconds": 1.3, "ok": true, "message": ""}, ...],
     "messages": [...], "data": {"sg_inq": "...", "fio": {...}}}
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class StepFailed(Exception):
    """A step's check did not hold; the message says what was expected and what happened."""


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def console(text: str) -> None:
    print(f"guest [{uptime():7.2f}] {text}", flush=True)


class Run:
    def __init__(self, results: Path, scenario: str) -> None:
        self.results = results
        self.params: dict[str, Any] = json.loads((results / "params.json").read_text())
        self.doc: dict[str, Any] = {
            "scenario": scenario,
            "status": "running",
            "boot_seconds": uptime(),
            "steps": [],
            "messages": [],
            "data": {},
        }
        self.part = ""  # the scenario the next steps belong to, when one boot runs several
        self._write()

    def _write(self) -> None:
        tmp = self.results / "results.json.tmp"
        tmp.write_text(json.dumps(self.doc, indent=1))
        tmp.replace(self.results / "results.json")

    def record(self, key: str, value: Any) -> None:
        """Keep `value` under data[key] in results.json (outputs, measurements)."""
        self.doc["data"][key] = value
        self._write()

    def message(self, text: str) -> None:
        console(text)
        self.doc["messages"].append(text)
        self._write()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        console(f"step {name}")
        started = time.monotonic()
        try:
            yield
        except Exception as exc:
            message = str(exc) if isinstance(exc, StepFailed) else f"{type(exc).__name__}: {exc}"
            self._step(name, started, False, message)
            raise StepFailed(f"{name}: {message}") from exc
        self._step(name, started, True, "")

    def _step(self, name: str, started: float, ok: bool, message: str) -> None:
        seconds = round(time.monotonic() - started, 3)
        console(f"step {name}: {'ok' if ok else 'FAILED'} in {seconds:.2f}s {message}")
        entry = {"name": name, "seconds": seconds, "ok": ok, "message": message, "part": self.part}
        self.doc["steps"].append(entry)
        self._write()

    def sh(
        self, *argv: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command; with `check`, a non-zero exit fails the step with its output."""
        console("$ " + " ".join(argv))
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        output = (proc.stdout + proc.stderr).strip()
        if output:
            console(output[-2000:])
        if check and proc.returncode != 0:
            raise StepFailed(f"{argv[0]} exited {proc.returncode}: {output[-500:]}")
        return proc

    def ask_host(self, action: str, timeout: float, argument: str = "") -> str:
        """Have the host carry out `action` (see Guest.run's `actions`) with `argument`;
        returns its answer."""
        console(f"asking the host to {action} {argument}")
        partial = self.results / "requests" / f"{action}.tmp"
        partial.write_text(argument)
        partial.replace(self.results / "requests" / action)
        reply = self.results / "replies" / action
        wait_for(reply.exists, timeout, f"the host to {action}")
        answer = reply.read_text()
        console(f"the host answered: {answer}")
        if answer.startswith("error:"):
            raise StepFailed(f"host action {action}: {answer}")
        return answer

    def finish(self, status: str) -> None:
        self.doc["status"] = status
        self._write()


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `condition` until truthy; a StepFailed naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StepFailed(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# kernel messages worth keeping: the SCSI/iSCSI stack, block layer errors, filesystems
KERNEL_LOG = re.compile(r"scsi|iscsi|\bsd[a-z]*\b|connection|I/O error|blk_|EXT4|session", re.I)


def record_kernel_log(run: Run) -> None:
    """The storage-related lines of dmesg (the serial console only gets warnings)."""
    proc = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30)
    lines = [line for line in proc.stdout.splitlines() if KERNEL_LOG.search(line)]
    run.record("dmesg", lines[-200:])


def main(scenario: str, body: Callable[[Run], None], argv: Sequence[str] = sys.argv) -> None:
    """The scenario program's entry point: `body(run)`, then status and exit code."""
    run = Run(Path(argv[1]), scenario)
    try:
        body(run)
    except StepFailed as exc:
        run.message(f"FAILED {exc}")
        record_kernel_log(run)
        run.finish("failed")
        sys.exit(1)
    except Exception as exc:  # a bug in the scenario itself: still report it
        run.message(f"scenario error {type(exc).__name__}: {exc}")
        record_kernel_log(run)
        run.finish("failed")
        sys.exit(2)
    record_kernel_log(run)
    run.finish("passed")
    os.sync()
