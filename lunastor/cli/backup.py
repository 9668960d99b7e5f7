"""`lunastor cluster backup|restore`: etcd snapshots, the whole of lunastor's metadata.

Backup streams etcd's maintenance Snapshot RPC to a file (the same bytes `etcdctl snapshot
save` writes, with etcd's trailing SHA-256, so `etcdctl snapshot restore` verifies it).
Restore is offline: `etcdctl snapshot restore` into a new data directory, then etcd is started
on it (docs/recovery.md has the whole procedure).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import grpc
from aetcd import rpc

from lunastor.cli import devcluster
from lunastor.common.etcd import EtcdConfig
from lunastor.common.etcd.client import open_channel


class BackupError(Exception):
    """Backup or restore failed; the message says why, in one line."""


def endpoints_for(option: str | None, directory: Path) -> list[str]:
    if option:
        return [e.strip() for e in option.split(",") if e.strip()]
    try:
        state = devcluster.read_state(directory)
    except devcluster.DevClusterError as exc:
        raise BackupError(f"{exc} (or pass --etcd HOST:PORT)") from None
    assert state is not None
    return list(state["etcd"]["endpoints"])


def _etcdctl() -> str:
    path = shutil.which("etcdctl")
    if path is None:
        raise BackupError("etcdctl is not installed (Debian: apt install etcd-client)")
    return path


def status(file: Path) -> dict[str, Any]:
    """etcdctl's view of a snapshot file: hash, revision, keys, size."""
    proc = subprocess.run(
        [_etcdctl(), "snapshot", "status", str(file), "-w", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ETCDCTL_API": "3"},
    )
    if proc.returncode != 0:
        raise BackupError(f"{file} is not a valid etcd snapshot: {proc.stderr.strip()}")
    data = json.loads(proc.stdout)
    return {
        "hash": data["hash"],
        "revision": data["revision"],
        "keys": data["totalKey"],
        "bytes": file.stat().st_size,
    }


def save(endpoints: list[str], file: Path, timeout: float = 600.0) -> dict[str, Any]:
    """Stream a snapshot from the first endpoint that answers into `file` (atomically)."""
    errors = []
    partial = file.with_name(file.name + ".part")
    for endpoint in endpoints:
        channel = open_channel(EtcdConfig(endpoints=[endpoint]), endpoint, aio=False)
        try:
            stub = rpc.MaintenanceStub(channel)
            with open(partial, "wb") as out:
                for chunk in stub.Snapshot(rpc.SnapshotRequest(), timeout=timeout):
                    out.write(chunk.blob)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, file)
            return status(file)
        except grpc.RpcError as exc:
            errors.append(f"{endpoint}: {exc.details() if hasattr(exc, 'details') else exc}")
        except OSError as exc:
            raise BackupError(f"cannot write {file}: {exc.strerror or exc}") from None
        finally:
            channel.close()
            partial.unlink(missing_ok=True)
    raise BackupError("no etcd endpoint gave a snapshot: " + "; ".join(errors))


def restore(file: Path, data_dir: Path, name: str, peer_url: str) -> None:
    if data_dir.exists() and any(data_dir.iterdir()):
        raise BackupError(f"{data_dir} is not empty; restore needs a new data directory")
    if data_dir.exists():
        data_dir.rmdir()  # etcdctl insists on creating it
    proc = subprocess.run(
        [
            _etcdctl(),
            "snapshot",
            "restore",
            str(file),
            "--data-dir",
            str(data_dir),
            "--name",
            name,
            "--initial-cluster",
            f"{name}={peer_url}",
            "--initial-advertise-peer-urls",
            peer_url,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "ETCDCTL_API": "3"},
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise BackupError(f"etcdctl snapshot restore failed: {lines[-1] if lines else '?'}")
