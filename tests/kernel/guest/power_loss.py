#!/usr/bin/python3
"""Guest scenarios power-loss (issue 8, scenario 7) and powerloss (issue 14): power loss under
chunk servers running in the guest.

The guest runs lunastor chunk servers (the host's venv and checkout, seen over 9p), each with
its data directory on its own virtio disk and its own address; the dev cluster's etcd is
reached through the host. A writer on the host writes with FUA to a volume that lives only
here (power-loss: one server, 1 replica; powerloss: three servers on three disks, 3 replicas).

- phase "first": mkfs.ext4 on every virtio disk, start the chunk servers, then ask the host to
  cut the power: the host starts its writer and SIGKILLs QEMU mid-run, so this program never
  hears back (the guest's page cache is lost with it).
- phase "reboot": mount the disks (ext4 replays its journal), start the chunk servers over the
  same data directories, ask the host to read every block back through every server and count
  the acknowledged writes that are lost, then stop the chunk servers (SIGTERM, exit 0).

params.json: part, phase, route, host, python, repo, etcd, servers (name, disk, mount, addr,
config: the chunk server's TOML, admin, portal; the first server's addr is eth0's own).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import urllib.request
from typing import Any

from steps import Run, StepFailed, console, main, wait_for


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


def launch(run: Run, server: dict[str, Any]) -> subprocess.Popen[bytes]:
    p = run.params
    config = f"/tmp/{server['name']}.toml"
    with open(config, "w") as f:
        f.write(server["config"])
    # unbuffered: the log must be on the results share before the power goes
    env = dict(os.environ, PYTHONPATH=p["repo"], LUNASTOR_STATUS_INTERVAL="1", PYTHONUNBUFFERED="1")
    log = open(f"/results/{server['name']}-{p['phase']}.log", "ab")  # noqa: SIM115 (kept open)
    return subprocess.Popen(
        [p["python"], "-m", "lunastor.chunk.main", "--config", config],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


def start_chunk_servers(run: Run, attempts: int = 4) -> dict[str, subprocess.Popen[bytes]]:
    """Start every chunk server at once and wait until each one's portal listens.

    Like a service manager would, one is started again when it exits during start-up: from a
    TCG guest on a loaded machine, its first etcd connection can time out (grpc's connect
    deadline), and the daemon then exits with "etcd unavailable"."""
    servers = run.params["servers"]
    procs = {s["name"]: launch(run, s) for s in servers}
    starts = dict.fromkeys(procs, 1)
    up: set[str] = set()

    def all_up() -> bool:
        for s in servers:
            name = s["name"]
            if name in up:
                continue
            status = procs[name].poll()
            if status is None:
                if healthy(s["admin"]):
                    up.add(name)
                continue
            if starts[name] >= attempts:
                raise StepFailed(f"{name} exited during start-up {attempts} times")
            run.message(f"{name} exited {status} during start-up ({starts[name]})")
            starts[name] += 1
            run.record("chunk_restarts", sum(starts.values()) - len(starts))
            procs[name] = launch(run, s)
        return len(up) == len(servers)

    wait_for(all_up, 700, "every chunk server to answer /healthz", interval=0.5)
    # /healthz answers before the iSCSI portal listens ("chunk server up" in its log)
    for s in servers:
        host, port = s["portal"].rsplit(":", 1)
        wait_for(
            lambda h=host, n=int(port): reachable(h, n),
            60,
            f"the portal {s['portal']}",
            interval=0.5,
        )
    return procs


def stop_chunk_servers(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    for name, proc in procs.items():
        try:
            status = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise StepFailed(f"{name} did not stop within 60s of SIGTERM") from None
        if status != 0:
            raise StepFailed(f"{name} exited {status} on SIGTERM")


def body(run: Run) -> None:
    p = run.params
    run.part = p["part"]
    first = p["phase"] == "first"
    servers = p["servers"]
    with run.step("virtio-disks" if not first else "virtio-disks-mkfs"):
        run.sh("ip", "route", "add", p["route"], "via", p["host"])
        for s in servers[1:]:  # the first one's is eth0's own
            run.sh("ip", "addr", "add", f"{s['addr']}/24", "dev", "eth0")
        run.sh("modprobe", "virtio_blk")
        for s in servers:
            wait_for(lambda disk=s["disk"]: os.path.exists(disk), 30, s["disk"])
            if first:
                run.sh("mkfs.ext4", "-q", "-F", s["disk"], timeout=300)
            os.makedirs(s["mount"], exist_ok=True)
            run.sh("mount", "-t", "ext4", s["disk"], s["mount"])
            os.makedirs(f"{s['mount']}/data", exist_ok=True)
    with run.step("reach-etcd"):
        host, port = p["etcd"].rsplit(":", 1)
        wait_for(lambda: reachable(host, int(port)), 30, f"etcd at {p['etcd']}", interval=0.5)
    with run.step("chunk-start"):
        procs = start_chunk_servers(run)
    if first:
        with run.step("power-cut"):
            run.ask_host("power-cut", 600)
            raise StepFailed("the host answered instead of cutting the power")
        return
    with run.step("verify"):
        answer = json.loads(run.ask_host("verify", 900))
        run.record("verify", answer)
        if answer["lost"]:
            raise StepFailed(f"{answer['lost']} acknowledged writes lost: {answer['detail']}")
    with run.step("chunk-stop"):
        stop_chunk_servers(procs)
        for s in servers:
            run.sh("umount", s["mount"])
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
