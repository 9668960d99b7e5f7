"""Start and stop real dev clusters (`lunastor dev up`) from tests."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

LUNASTOR = [sys.executable, "-m", "lunastor.cli.main"]


def random_prefix() -> str:
    """A 127.N prefix unlikely to collide with another cluster on this machine."""
    return f"127.{random.randint(100, 250)}"


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


def dev_up(directory: Path, chunks: int = 3, lease_ttl: float = 2.0) -> dict[str, Any]:
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
