"""The kernel-initiator scenarios: what the host starts, what the guest runs, what is checked.

Each scenario is one boot: a fresh namespace, lunastor's standalone target inside it, and a
guest program from `guest/`. `run_scenario` returns everything a report needs; both
`python -m tests.kernel` and the pytest tests call it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.kernel.harness import Action, BootFiles, Guest, GuestNet, GuestResult
from tests.kernel.initramfs import GUEST_DIR
from tests.kernel.target import StandaloneTarget

MIB = 1 << 20
TARGET_IQN = "iqn.2025-01.io.lunastor.test:kernel-disk"
GUEST_IQN = "iqn.2025-01.io.lunastor.test:kernel-guest"
OTHER_IQN = "iqn.2025-01.io.lunastor.test:not-in-the-acl"
CHAP_USER = "kernel-guest"
CHAP_SECRET = "lunastor-chap-16"  # 16 bytes: some initiators insist on at least 12


@dataclass
class ScenarioResult:
    name: str
    passed: bool
    guest: GuestResult | None
    host_steps: dict[str, float]  # host-side timings, seconds
    problems: list[str]  # why it failed, one line each
    workdir: Path
    notes: list[str] = field(default_factory=list)  # measurements worth a place on the line

    def line(self) -> str:
        """One line: verdict, total and per-step timings."""
        verdict = "PASS" if self.passed else "FAIL"
        host = ", ".join(f"{k} {v:.1f}s" for k, v in self.host_steps.items())
        steps = self.guest.summary() if self.guest else ""
        boot = ""
        if self.guest and self.guest.boot_seconds is not None:
            boot = f"boot {self.guest.boot_seconds:.1f}s, "
        rss = ""
        if self.guest and self.guest.max_rss_kb:
            rss = f", qemu max RSS {self.guest.max_rss_kb // 1024} MiB"
        notes = f"; {', '.join(self.notes)}" if self.notes else ""
        extra = f" -- {'; '.join(self.problems)}" if self.problems else ""
        return f"{verdict} {self.name}: {host}; {boot}{steps}{rss}{notes}{extra}"


@dataclass
class Scenario:
    name: str
    script: Path
    params: dict[str, Any]
    allow: list[str] = field(default_factory=list)
    chap: str | None = None
    timeout: float = 240
    # after the guest is done and the target stopped: problems found in the backing file
    host_check: Callable[[StandaloneTarget, GuestResult], list[str]] | None = None
    # what the guest may ask the host to do to the target mid-scenario (Guest.run's actions)
    actions: Callable[[StandaloneTarget], Mapping[str, Action]] | None = None


def _debugfs_sha256(image: Path, name: str) -> str | None:
    """sha256 of /name inside an ext4 image, read by debugfs (no mount, no guest involved)."""
    proc = subprocess.run(
        ["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True, timeout=60
    )
    if proc.returncode != 0:
        return None
    return hashlib.sha256(proc.stdout).hexdigest()


def check_backing_file(target: StandaloneTarget, guest: GuestResult) -> list[str]:
    """The files the guest wrote are in the target's backing file, byte for byte."""
    if shutil.which("debugfs") is None:
        return ["debugfs missing (e2fsprogs)"]
    problems = []
    for name, digest in guest.data.get("sha256", {}).items():
        found = _debugfs_sha256(target.file, name)
        if found != digest:
            problems.append(f"{name} in the backing file: sha256 {found}, guest wrote {digest}")
    return problems


def basic(size: int = 256 * MIB) -> Scenario:
    return Scenario(
        name="iscsi-basic",
        script=GUEST_DIR / "iscsi_basic.py",
        params={
            "iqn": TARGET_IQN,
            "initiator": GUEST_IQN,
            "lun": 0,
            "size": size,
            "files": {"small.bin": 4096, "odd.bin": MIB + 4321, "big.bin": 32 * MIB},
            "fio_seconds": 10,
        },
        allow=[GUEST_IQN],
        host_check=check_backing_file,
    )


def chap(size: int = 256 * MIB) -> Scenario:
    return Scenario(
        name="iscsi-chap",
        script=GUEST_DIR / "iscsi_chap.py",
        params={
            "iqn": TARGET_IQN,
            "initiator": GUEST_IQN,
            "lun": 0,
            "size": size,
            "user": CHAP_USER,
            "secret": CHAP_SECRET,
            "wrong_secret": "not-the-secret-16",
            "other_initiator": OTHER_IQN,
        },
        allow=[GUEST_IQN],
        chap=f"{CHAP_USER}:{CHAP_SECRET}",
    )


def restart(size: int = 256 * MIB) -> Scenario:
    return Scenario(
        name="iscsi-restart",
        script=GUEST_DIR / "iscsi_restart.py",
        params={
            "iqn": TARGET_IQN,
            "initiator": GUEST_IQN,
            "lun": 0,
            "size": size,
            "fio_seconds": 15,
            "pattern_mib": 8,
        },
        actions=lambda target: {"restart-target": lambda _: target.restart()},
    )


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "iscsi-basic": basic,
    "iscsi-chap": chap,
    "iscsi-restart": restart,
}


def run_scenario(
    scenario: Scenario,
    boot: BootFiles,
    workdir: Path,
    log_level: str = "INFO",
    keep_target_log: bool = True,
) -> ScenarioResult:
    """Namespace, target, one guest boot, checks; everything is torn down before returning.

    A passed scenario's backing file is deleted, and its target log too unless
    `keep_target_log` (at DEBUG the target logs whole data segments: ~60 MB a run; INFO, the
    default, runs the target as in production, fast path included).
    """
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    host_steps: dict[str, float] = {}
    problems: list[str] = []
    guest_result = None
    with GuestNet() as net:
        target = StandaloneTarget(
            net,
            workdir,
            iqn=scenario.params["iqn"],
            size=scenario.params["size"],
            allow=scenario.allow,
            chap=scenario.chap,
            log_level=log_level,
        )
        started = time.monotonic()
        try:
            target.start()
            host_steps["target-start"] = time.monotonic() - started
            guest = Guest(net, workdir, boot)
            params = dict(scenario.params, portal=target.portal)
            actions = scenario.actions(target) if scenario.actions else None
            guest_result = guest.run(scenario.script, params, scenario.timeout, actions)
            host_steps["guest"] = guest_result.wall_seconds
        finally:
            status = target.stop()
        if status not in (0, None):
            problems.append(f"target exited {status} on SIGTERM (see target.log)")
        if guest_result is not None:
            if not guest_result.passed:
                problems += [f"guest {guest_result.status}", *guest_result.messages]
            elif scenario.host_check is not None:
                checked = time.monotonic()
                problems += scenario.host_check(target, guest_result)
                host_steps["host-check"] = time.monotonic() - checked
    passed = guest_result is not None and guest_result.passed and not problems
    if passed:
        target.file.unlink(missing_ok=True)
        if not keep_target_log:
            target.log.unlink(missing_ok=True)
    return ScenarioResult(scenario.name, passed, guest_result, host_steps, problems, workdir)
