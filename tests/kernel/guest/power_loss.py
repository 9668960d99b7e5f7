#!/usr/bin/python3
"""Guest scenario (issue 8, scenario 7): power loss under a chunk server running in the guest.

The guest runs a lunastor chunk server (the host's venv and checkout, seen over 9p) whose data
directory is on the virtio disk; the dev cluster's etcd is reached through the host. A writer
on the host writes to a 1-replica volume that lives only here, with FUA.

- phase "first": mkfs.ext4 on the virtio disk, start the chunk server, then ask the host to
  cut the power: the host starts its writer and SIGKILLs QEMU mid-run, so this program never
  hears back (the guest's page cache is lost with it).
- phase "reboot": mount the disk (ext4 replays its journal), start the chunk server over the
  same data directory, ask the host to read every block back and count the acknowledged
  writes that are lost, then stop the chunk server (SIGTERM, exit 0).

params.json: phase, route, host, python, repo, config (the chunk server's TOML), admin, etcd,
portal.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import urllib.request

from steps import Run, StepFailed, console, main, wait_for

DISK = "/dev/vda"
MOUNT = "/mnt/chunk"


def healthy(admin: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{admin}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        console(f"{host}:{port}: {exc}")
        return False
    return True


def start_chunk_server(run: Run, attempts: int = 4) -> subprocess.Popen[bytes]:
    """Start the chunk server and wait until its portal listens.

    Like a service manager would, it is started again when it exits during start-up: from a
    TCG guest on a loaded machine, its first etcd connection can time out (grpc's connect
    deadline), and the daemon then exits with "etcd unavailable"."""
    p = run.params
    config = "/tmp/chunk.toml"
    with open(config, "w") as f:
        f.write(p["config"])
    # unbuffered: the log must be on the results share before the power goes
    env = dict(os.environ, PYTHONPATH=p["repo"], LUNASTOR_STATUS_INTERVAL="1", PYTHONUNBUFFERED="1")
    for attempt in range(1, attempts + 1):
        log = open(f"/results/chunk-{p['phase']}.log", "ab")  # noqa: SIM115 (the server keeps it)
        proc = subprocess.Popen(
            [p["python"], "-m", "lunastor.chunk.main", "--config", config],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )

        def up(proc: subprocess.Popen[bytes] = proc) -> bool:
            return proc.poll() is not None or healthy(p["admin"])

        wait_for(up, 240, "the chunk server to answer /healthz", interval=0.5)
        if proc.poll() is None:
            break
        run.message(f"the chunk server exited {proc.returncode} during start-up ({attempt})")
        run.record("chunk_restarts", attempt)
    else:
        raise StepFailed(f"the chunk server exited during start-up {attempts} times")
    # /healthz answers before the iSCSI portal listens ("chunk server up" in its log)
    host, port = p["portal"].rsplit(":", 1)
    wait_for(lambda: reachable(host, int(port)), 60, f"the portal {p['portal']}", interval=0.5)
    return proc


def body(run: Run) -> None:
    p = run.params
    run.part = "power-loss"
    first = p["phase"] == "first"
    with run.step("virtio-disk" if not first else "virtio-disk-mkfs"):
        run.sh("ip", "route", "add", p["route"], "via", p["host"])
        run.sh("modprobe", "virtio_blk")
        wait_for(lambda: os.path.exists(DISK), 30, DISK)
        if first:
            run.sh("mkfs.ext4", "-q", "-F", DISK, timeout=300)
        os.makedirs(MOUNT, exist_ok=True)
        run.sh("mount", "-t", "ext4", DISK, MOUNT)
        os.makedirs(f"{MOUNT}/data", exist_ok=True)
    with run.step("reach-etcd"):
        host, port = p["etcd"].rsplit(":", 1)
        wait_for(lambda: reachable(host, int(port)), 30, f"etcd at {p['etcd']}", interval=0.5)
    with run.step("chunk-start"):
        proc = start_chunk_server(run)
    if first:
        with run.step("power-cut"):
            run.ask_host("power-cut", 600)
            raise StepFailed("the host answered instead of cutting the power")
        return
    with run.step("verify"):
        answer = json.loads(run.ask_host("verify", 600))
        run.record("verify", answer)
        if answer["lost"]:
            raise StepFailed(f"{answer['lost']} acknowledged writes lost: {answer['detail']}")
    with run.step("chunk-stop"):
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise StepFailed("the chunk server did not stop within 60s of SIGTERM") from None
        if status != 0:
            raise StepFailed(f"the chunk server exited {status} on SIGTERM")
        run.sh("umount", MOUNT)
        errors = [
            line
            for line in subprocess.run(
                ["dmesg"], capture_output=True, text=True
            ).stdout.splitlines()
            if "EXT4-fs error" in line
        ]
        if errors:
            raise StepFailed(f"ext4 reported errors: {errors[:3]}")


main("power-loss", body)
