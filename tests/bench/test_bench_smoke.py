"""`python -m bench` end to end on the two cheap systems (tgt and the standalone target), a
second per job: it measures, prints its tables, writes its JSON and leaves nothing running;
interrupted, it still stops what it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.devcluster import pid_alive
from tests.support.procs import wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def bench(*args: str, out: Path, workdir: Path) -> list[str]:
    return [
        sys.executable, "-m", "bench", *args, "--size", "64MiB",
        "--out", str(out), "--workdir", str(workdir),
    ]  # fmt: skip


def children(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == pid:
                        out.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return out


def test_bench_measures_tgt_and_standalone_and_cleans_up(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    argv = bench("--only", "tgt,standalone", "--seconds", "1", "--jobs", "rr4k,sw1m,qd1wf",
                 out=out, workdir=work)  # fmt: skip
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result_file,) = out.glob("bench-*.json")
    result = json.loads(result_file.read_text())
    for system in ("tgt", "standalone"):
        jobs = result["results"][system]
        assert set(jobs) == {"rr4k", "sw1m", "qd1wf"}
        for name, r in jobs.items():
            assert "error" not in r, (system, name, r)
            assert r["ios"] > 0 and r["seconds"] > 0 and r["server_cpu_s"] >= 0
        pids = result["systems"][system]["pids"]
        assert pids and not any(pid_alive(p) for p in pids), f"{system} left {pids} running"
    assert result["machine"]["fdatasync_per_s"] > 0
    assert result["machine"]["direct_write_mbps"] > 0
    assert "standalone.rr4k.x_tgt" in result["measures"]
    text = proc.stdout
    assert "4 KiB random, QD32 (IOPS; more is better)" in text
    assert "1 MiB sequential, QD8 (MB/s; more is better)" in text
    assert "write+flush" in text and "the issues' goals" in text
    assert list(work.iterdir()) == []  # the temporary directory is gone


def test_an_interrupted_bench_stops_what_it_started(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    argv = bench("--only", "tgt", "--seconds", "20", "--jobs", "rr4k", out=out, workdir=work)
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # a suite started in the background by a non-interactive shell inherits SIGINT
        # ignored, and so would the bench: it then ran to its end (returncode 0)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:

        def tgtd_started() -> list[int]:
            return [
                p for p in children(proc.pid)
                if Path(f"/proc/{p}/comm").read_text().strip() == "tgtd"
            ]  # fmt: skip

        wait_for(tgtd_started, 60, "the bench to start tgtd", interval=0.2)
        time.sleep(3)  # into the job: qemu-img runs
        started = children(proc.pid)  # tgtd, qemu-img
        proc.send_signal(signal.SIGINT)  # to the bench alone: its children must be stopped by it
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output.decode()[-3000:]
    assert b"interrupted: everything the bench started has been stopped" in output
    assert len(started) >= 1 and not any(pid_alive(p) for p in started), started
    assert list(work.iterdir()) == []
