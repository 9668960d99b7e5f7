"""Start and stop real dev clusters (`lunastor dev up`) from tests."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

LUNASTOR = [sys.executable, "-m", "lunastor.cli.main"]


def random_prefix() -> str:
    """A 127.N prefix no other cluster on this machine uses now: nothing listening on its
    etcd or meta port. Test runs side by side could draw the same one, and one cluster's
    CLI then reached the other's meta (the likely cause of "401 unknown bearer token"
    seen under load)."""
    free = list(range(100, 251))
    random.shuffle(free)
    for n in free:
        if not any(_listening(f"127.{n}.0.1", port) for port in (2379, 8080)):
            return f"127.{n}"
    raise AssertionError("every 127.N prefix from 100 to 250 is in use")


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def lunastor(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [*LUNASTOR, *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"lunastor {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def dev_up(
    directory: Path,
    chunks: int = 3,
    lease_ttl: float = 2.0,
    etcd_members: int = 1,
    chunk_workers: int = 1,
) -> dict[str, Any]:
    lunastor(
        "dev",
        "up",
        "--detach",
        "--dir",
        str(directory),
        "--chunks",
        str(chunks),
        "--address-prefix",
        random_prefix(),
        "--lease-ttl",
        str(lease_ttl),
        "--etcd-members",
        str(etcd_members),
        "--chunk-workers",
        str(chunk_workers),
    )
    return read_state(directory)


def read_state(directory: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((directory / "cluster.json").read_text())
    return state


def cluster_status(directory: Path) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(
        lunastor("cluster", "status", "--json", "--dir", str(directory)).stdout
    )
    return status


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
