#!/usr/bin/env python3
"""Guest scenario lio-export: lunastor's LIO export (TCMU) in the guest, checked from the host.

The guest loads LIO (configfs, target_core_mod, target_core_user, iscsi_target_mod) and runs
`python -m lunastor.chunk.access.lio.main` against the host's etcd and chunk servers. Once LIO holds
the exported target, it asks the host to check it: libiscsi reaches the guest's LIO portal,
data written through LIO reads back through a chunk server's userspace portal and the other
way round, and throughput is measured (host action "lio-ready"; with params["conformance"]
the host also runs iscsi-test-cu against it). Then the export is stopped with SIGTERM, which
must exit 0 and leave no lunastor target in LIO.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from steps import Run, StepFailed, main, wait_for

CONFIGFS = Path("/sys/kernel/config")
ISCSI = CONFIGFS / "target" / "iscsi"


def load_lio(run: Run) -> None:
    for module in ("configfs", "target_core_mod", "target_core_user", "iscsi_target_mod"):
        run.sh("modprobe", module)
    if not (CONFIGFS / "target").exists():
        run.sh("mount", "-t", "configfs", "configfs", str(CONFIGFS))
    wait_for((CONFIGFS / "target").exists, 10, "configfs target/")


def tpg_enabled(iqn: str) -> bool:
    enable = ISCSI / iqn / "tpgt_1" / "enable"
    try:
        return enable.read_text().strip() == "1"
    except OSError:
        return False


def lio_tree() -> list[str]:
    """The configfs entries of lunastor's LIO configuration, for the record."""
    found = []
    for root in (CONFIGFS / "target" / "core", ISCSI):
        for path in sorted(root.rglob("*")):
            rel = str(path.relative_to(CONFIGFS / "target"))
            if "lunastor" in rel and path.is_dir() and rel.count("/") <= 6:
                found.append(rel)
    return found


def body(run: Run) -> None:
    p = run.params
    iqn = p["iqn"]
    log = run.results / "lio-export.log"
    with run.step("load-lio"):
        load_lio(run)
    with run.step("start-export"):
        Path("/tmp/lio-export").mkdir(exist_ok=True)  # its identity file (data_dirs)
        config = Path("/tmp/lio.toml")
        config.write_text(p["config"])
        env = dict(os.environ, PYTHONPATH=p["repo"], PYTHONDONTWRITEBYTECODE="1")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    p["python"],
                    "-m",
                    "lunastor.chunk.access.lio.main",
                    "--config",
                    str(config),
                    "--userspace-portal",
                    p["userspace_portal"],
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd="/tmp",
            )

        def ready() -> bool:
            if proc.poll() is not None:
                raise StepFailed(f"lio export exited {proc.returncode}: {log.read_text()[-1500:]}")
            return tpg_enabled(iqn) and "LIO export serving" in log.read_text()

        wait_for(ready, p["start_timeout"], f"LIO to serve {iqn}")
        run.record("lio_tree", lio_tree())
    with run.step("host-checks"):
        answer = run.ask_host("lio-ready", p["host_timeout"])
        run.record("host", answer)
    with run.step("stop-export"):
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise StepFailed("the lio export did not exit within 60s of SIGTERM") from None
        if code != 0:
            raise StepFailed(f"the lio export exited {code} on SIGTERM: {log.read_text()[-800:]}")
        if (ISCSI / iqn).exists():
            raise StepFailed(f"{iqn} is still in LIO after the export stopped")
        leftovers = [e for e in lio_tree() if "lunastor" in e]
        if leftovers:
            raise StepFailed(f"left in LIO: {leftovers[:5]}")


if __name__ == "__main__":
    main("lio-export", body)
